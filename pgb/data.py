"""Load one split of a task into a pandas DataFrame in the Hugging Face schema.

Sources, first match wins:

1. ``files={"train": path, ...}``: one file per split, format by extension
   (``.parquet``, ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, each optionally ``.gz``).
2. A data folder ``D`` (argument, else env ``PGB_DATA_DIR``):
   ``D/<task>/<split>.<ext>`` then ``D/<split>.<ext>``; for GLUE also the original TSV
   distribution ``D/<GLUE folder>/{train,dev,dev_matched,dev_mismatched}.tsv``
   (e.g. ``D/SST-2/dev.tsv``, or ``D`` itself when it is named ``SST-2``); for SQuAD
   the official JSON ``D/squad*/*{train,dev}*.json[.gz]`` (split ``validation`` = dev).
3. The Hugging Face hub, unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set.

Rows come back with the task's text columns, an integer (classification) or float32
(regression) label column and ``idx``; SQuAD rows have ``id, title, context, question,
answers`` with ``answers = {"text": [...], "answer_start": [...]}``.

String class labels are mapped to ids: by ``task.label_names`` when the task has them (GLUE
RTE/QNLI/MNLI TSVs), else by the sorted unique labels of the train split (custom tasks).
The names in id order are stored in ``df.attrs["label_names"]``; read them with
:func:`label_names_of`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pgb.tasks import Task

logger = logging.getLogger(__name__)

EXTENSIONS = ("parquet", "jsonl", "json", "csv", "tsv")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
QA_COLUMNS = ("id", "context", "question", "answers")


@dataclass(frozen=True)
class GlueTsv:
    """Layout of one original GLUE TSV distribution (``CoLA/train.tsv``, ``MRPC/dev.tsv`` ...)."""

    folder: str
    columns: Mapping[str, str]  # TSV column -> HF glue column
    no_header: tuple[str, ...] | None = None  # column names when the file has no header row


GLUE_TSV = {
    "cola": GlueTsv("CoLA", {"sentence": "sentence", "label": "label"},
                    no_header=("source", "label", "original_label", "sentence")),
    "sst2": GlueTsv("SST-2", {"sentence": "sentence", "label": "label"}),
    "mrpc": GlueTsv("MRPC", {"#1 String": "sentence1", "#2 String": "sentence2",
                             "Quality": "label"}),
    "stsb": GlueTsv("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2",
                              "score": "label"}),
    "qqp": GlueTsv("QQP", {"question1": "question1", "question2": "question2",
                           "is_duplicate": "label"}),
    "mnli": GlueTsv("MNLI", {"sentence1": "premise", "sentence2": "hypothesis",
                             "gold_label": "label"}),
    "qnli": GlueTsv("QNLI", {"question": "question", "sentence": "sentence", "label": "label"}),
    "rte": GlueTsv("RTE", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
    "wnli": GlueTsv("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data folder: the explicit argument, else env ``PGB_DATA_DIR``, else ``None``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("PGB_DATA_DIR", "")
    return Path(env).expanduser() if env else None


def label_names_of(df: pd.DataFrame) -> tuple[str, ...] | None:
    """Class names in label-id order that :func:`load_split` attached, or ``None``."""
    names = df.attrs.get("label_names")
    return tuple(names) if names is not None else None


def with_data_labels(task: Task, df: pd.DataFrame) -> Task:
    """Fill a custom classification task's ``num_labels``/``label_names`` from a loaded train split.

    Example: ``custom_task(["text"], "y")`` has ``num_labels=0``; after loading a train file
    with labels ``{"neg", "pos"}``, ``with_data_labels(task, df).num_labels == 2``.
    """
    if task.kind != "classification":
        return task
    names = label_names_of(df)
    num = task.num_labels or (len(names) if names else int(df[task.label_column].max()) + 1)
    if task.label_names is None and names is not None and len(names) == num:
        return replace(task, num_labels=num, label_names=names)
    return replace(task, num_labels=max(num, 2))


def load_split(
    task: Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    files: Mapping[str, str | os.PathLike] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Load ``split`` of ``task`` as a validated DataFrame (see the module docstring).

    Args:
        task: the task (columns, label kind, hub location).
        split: ``"train"``, ``"validation"``, ``"validation_matched"``, ...
        data_dir: local data folder; ``None`` falls back to env ``PGB_DATA_DIR``, then the hub.
        files: explicit ``{split: path}`` files; takes precedence over ``data_dir``.
        max_samples: keep a seeded random subset of this many rows (original order kept).
        seed: seed of that subset.

    Raises:
        FileNotFoundError: no folder / file / hub access for the split.
        ValueError: unknown split, missing columns, empty split, bad labels.
    """
    df, source = _read_raw(task, split, data_dir, files)
    names = task.label_names
    if names is None and _has_text_labels(task, df):
        names = _names_from_train(task, split, df, data_dir, files)
    df = _standardize(task, split, df, source, names)
    return _subsample(df, max_samples, seed)


# ----------------------------------------------------------------------------- finding files


def _read_raw(task: Task, split: str, data_dir, files) -> tuple[pd.DataFrame, str]:
    if files is not None:
        if split not in files:
            raise ValueError(
                f"no file for split {split!r} of task {task.name!r}: files has splits "
                f"{sorted(files)}; add {split!r}: PATH to files"
            )
        path = Path(files[split]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{split} file {path} for task {task.name!r} does not exist")
        return read_table_file(path), str(path)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _read_hub(task, split), f"hub {task.hub_path}"
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist; pass --data-dir (or PGB_DATA_DIR) pointing "
            f"at a folder laid out like {_layout_hint(task, split, 'DIR')}"
        )
    path, glue = _find_local(task, split, root)
    frame = read_glue_tsv(task.name, path) if glue else read_table_file(path)
    return frame, str(path)


def _find_local(task: Task, split: str, root: Path) -> tuple[Path, bool]:
    """(path, is_original_glue_tsv) of the split file under ``root``."""
    glue = GLUE_TSV.get(task.name)
    for folder in (root / task.name, root):
        if glue is not None and folder.name == glue.folder:
            continue  # original GLUE TSVs have their own layout, handled below
        for ext in EXTENSIONS:
            for gz in ("", ".gz"):
                if (path := folder / f"{split}.{ext}{gz}").is_file():
                    return path, False
    if glue is not None:
        stem = split.replace("validation", "dev")
        for folder in (root / glue.folder, root):
            if folder.name == glue.folder and (path := folder / f"{stem}.tsv").is_file():
                return path, True
    if task.kind == "qa" and (path := _find_squad(task, split, root)) is not None:
        return path, False
    raise FileNotFoundError(_missing_split_message(task, split, root))


def _find_squad(task: Task, split: str, root: Path) -> Path | None:
    """Official SQuAD JSON: ``root/squad*/*dev*.json*``; skips files of the other version."""
    key = {"validation": "dev"}.get(split, split)
    other = "v1" if task.squad_v2 else "v2"
    dirs = [root / task.name, *sorted(root.glob("squad*")), root]
    for folder in dict.fromkeys(d for d in dirs if d.is_dir() and other not in d.name.lower()):
        hits = sorted(
            p for p in folder.glob(f"*{key}*.json*") if p.is_file() and other not in p.name.lower()
        )
        if hits:
            if len(hits) > 1:
                logger.info("several %s files in %s; using %s", key, folder, hits[0].name)
            return hits[0]
    return None


def _missing_split_message(task: Task, split: str, root: Path) -> str:
    folders = [root / task.name, root, *(root.glob("squad*") if task.kind == "qa" else ())]
    if task.name in GLUE_TSV:
        folders.append(root / GLUE_TSV[task.name].folder)
    found = sorted({
        str(p.relative_to(root)) for folder in folders if folder.is_dir()
        for p in folder.iterdir() if p.is_file()
    })
    shown = ", ".join(found[:30]) + (" ..." if len(found) > 30 else "") or "none"
    return (
        f"no {split!r} split for task {task.name!r} under {root}; files found: {shown}. "
        f"Expected a file like {_layout_hint(task, split, str(root))}, or pick a split "
        "that exists there"
    )


def _layout_hint(task: Task, split: str, root: str) -> str:
    if task.kind == "qa":
        version = "v2.0" if task.squad_v2 else "v1.1"
        name = "dev" if split == "validation" else split
        return f"{root}/{task.name}/{name}-{version}.json (official SQuAD JSON, .gz allowed)"
    hint = f"{root}/{task.name}/{split}.parquet (HF glue schema; also .jsonl/.json/.csv/.tsv)"
    if task.name in GLUE_TSV:
        stem = split.replace("validation", "dev")
        hint += f" or the original GLUE {root}/{GLUE_TSV[task.name].folder}/{stem}.tsv"
    return hint


def _offline() -> bool:
    values = (os.environ.get(v, "").strip().lower() for v in OFFLINE_VARS)
    return any(v not in ("", "0", "false", "no", "off") for v in values)


def _read_hub(task: Task, split: str) -> pd.DataFrame:
    fix = (
        f"no data folder was given. Pass --data-dir DIR or set PGB_DATA_DIR=DIR, with "
        f"{_layout_hint(task, split, 'DIR')}"
    )
    where = f"task {task.name!r} split {split!r}"
    if task.hub_path is None:
        raise FileNotFoundError(f"{where}: the task has no hub dataset and {fix}, or pass files=")
    if _offline():
        raise FileNotFoundError(f"{where}: the hub is offline (HF_HUB_OFFLINE is set) and {fix}")
    try:
        import datasets

        ds = datasets.load_dataset(task.hub_path, task.hub_name, split=split)
    except Exception as err:  # any hub failure: network, missing split, auth
        raise FileNotFoundError(
            f"{where}: loading {task.hub_path}/{task.hub_name} from the hub failed ({err}); {fix}"
        ) from err
    return ds.to_pandas()


# ----------------------------------------------------------------------------- reading files


def read_table_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``.parquet/.jsonl/.json/.csv/.tsv`` file (optionally ``.gz``) into a DataFrame.

    A ``.json`` file in the official SQuAD layout is flattened to one row per question.
    """
    path = Path(path)
    name = path.name.lower()
    ext = Path(name.removesuffix(".gz")).suffix
    readers = {".parquet": pd.read_parquet, ".csv": _read_csv, ".tsv": _read_tsv,
               ".jsonl": _read_jsonl, ".json": _read_json}
    if ext not in readers:
        raise ValueError(
            f"cannot read {path}: unknown extension {ext or '(none)'}; use one of "
            ".parquet, .jsonl, .json, .csv, .tsv (optionally .gz)"
        )
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as fh:
        return readers[ext](io.BytesIO(fh.read()))


def read_glue_tsv(task_name: str, path: str | os.PathLike) -> pd.DataFrame:
    """Read an original GLUE TSV (``CoLA/dev.tsv`` ...) into HF glue columns (labels as text).

    Parsed with the csv module and no quoting, as GLUE's own loaders do: the sentences hold
    unbalanced quotes, and a few rows carry extra fields (ignored) or too few (skipped).
    """
    spec = GLUE_TSV[task_name]
    with open(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: MRPC has a BOM
        rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    header = list(spec.no_header) if spec.no_header else rows.pop(0)
    missing = [c for c in spec.columns if c not in header]
    if missing:
        raise ValueError(f"{path} is not a GLUE {spec.folder} TSV: its header lacks {missing}, "
                         f"found {header}; use the original GLUE file or the HF parquet schema")
    cols = {header.index(src): dst for src, dst in spec.columns.items()}
    kept = [r for r in rows if len(r) > max(cols)]
    if len(kept) < len(rows):
        logger.warning("%s: skipped %d rows with missing fields", path, len(rows) - len(kept))
    return pd.DataFrame({dst: [r[i] for r in kept] for i, dst in cols.items()})


def _read_csv(fh) -> pd.DataFrame:
    # Only empty cells are missing: a sentence "NA" or "null" stays text.
    return pd.read_csv(fh, keep_default_na=False, na_values=[""])


def _read_tsv(fh) -> pd.DataFrame:
    return pd.read_csv(fh, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                       na_values=[""])


def _read_jsonl(fh) -> pd.DataFrame:
    return pd.read_json(fh, lines=True, dtype=False)


def _read_json(fh) -> pd.DataFrame:
    raw = fh.read()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:  # many ".json" files (e.g. datasets' to_json) are JSON lines
        return _read_jsonl(io.BytesIO(raw))
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        articles = obj["data"]
        if articles and isinstance(articles[0], dict) and "paragraphs" in articles[0]:
            return flatten_squad(obj)
        obj = articles
    if not isinstance(obj, list):
        raise ValueError("a .json data file must hold a list of records or {'data': [...]}")
    return pd.DataFrame(obj)


def flatten_squad(obj: Mapping) -> pd.DataFrame:
    """Official nested SQuAD JSON -> one row per question (id, title, context, question, answers).

    Unanswerable v2 questions (``is_impossible``) get empty answer lists, as in HF ``squad_v2``.
    """
    rows = []
    for article in obj["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({
                    "id": str(qa["id"]), "title": article.get("title", ""),
                    "context": para["context"], "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers]},
                })
    return pd.DataFrame(rows, columns=["id", "title", "context", "question", "answers"])


# ----------------------------------------------------------------------------- validation


def _has_text_labels(task: Task, df: pd.DataFrame) -> bool:
    col = task.label_column
    if task.kind != "classification" or col not in df.columns:
        return False
    return pd.to_numeric(df[col].dropna(), errors="coerce").isna().any()


def _names_from_train(task: Task, split: str, df, data_dir, files) -> tuple[str, ...]:
    """Sorted unique label strings of the train split (this split if there is no train split)."""
    train = df
    if split != "train":
        try:
            train = _read_raw(task, "train", data_dir, files)[0]
        except (FileNotFoundError, ValueError):
            logger.warning("no train split for %s: label ids come from %s alone", task.name, split)
    if task.label_column not in train.columns:
        train = df
    return tuple(sorted(set(train[task.label_column].dropna().astype(str))))


def _standardize(task: Task, split: str, df: pd.DataFrame, source: str, names) -> pd.DataFrame:
    where = f"task {task.name!r} split {split!r} ({source})"
    if len(df) == 0:
        raise ValueError(f"{where} is empty; point at a file with at least one row")
    needed = QA_COLUMNS if task.kind == "qa" else (*task.text_columns, task.label_column)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {missing}; columns found: {list(df.columns)}. Rename them "
            "to the HF schema or, for a custom task, set text_columns/label_column to match"
        )
    df = df.reset_index(drop=True)
    for col in task.text_columns:
        df[col] = _text_column(df[col], where)
    if task.kind == "classification":
        df[task.label_column] = _class_labels(df[task.label_column], task, names, where)
    elif task.kind == "regression":
        df[task.label_column] = _float_labels(df[task.label_column], where)
    else:
        df["answers"] = _answers(df["answers"], task, where)
    if task.kind != "qa" and "idx" not in df.columns:
        df["idx"] = np.arange(len(df), dtype=np.int64)
    df.attrs = {"label_names": names if task.kind == "classification" else None,
                "task": task.name, "split": split, "source": source}
    return df


def _text_column(col: pd.Series, where: str) -> pd.Series:
    n_null = int(col.isna().sum())
    if n_null:
        logger.warning("%s: %d empty %r values read as ''", where, n_null, col.name)
    return col.fillna("").astype(str)


def _class_labels(col: pd.Series, task: Task, names, where: str) -> pd.Series:
    if col.isna().any():
        raise ValueError(f"{where}: {int(col.isna().sum())} rows have no label in {col.name!r}")
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.isna().any():  # text labels: map through the label names
        ids = {str(n): i for i, n in enumerate(names or ())}
        unknown = sorted(set(col.astype(str)) - set(ids))
        if unknown:
            raise ValueError(
                f"{where}: labels {unknown[:10]} are not among the label names {list(ids)}; "
                "fix the labels or pass label_names that include them"
            )
        numeric = col.astype(str).map(ids)
    values = numeric.to_numpy(dtype=np.float64)
    if not np.all(values == np.round(values)):
        raise ValueError(f"{where}: classification labels must be integers, found e.g. "
                         f"{values[values != np.round(values)][:5].tolist()}")
    values = values.astype(np.int64)
    high = task.num_labels or np.iinfo(np.int64).max  # 0 = custom task, count classes later
    bad = sorted(set(values[(values < 0) | (values >= high)].tolist()))
    if bad:
        hint = (" Label -1 marks hidden test labels (GLUE/HF test splits): evaluate on "
                "'validation' instead." if -1 in bad else " Fix the labels or set num_labels.")
        raise ValueError(f"{where}: labels must be integers in [0, {task.num_labels}), "
                         f"found {bad[:10]}.{hint}")
    return pd.Series(values, index=col.index, name=col.name)


def _float_labels(col: pd.Series, where: str) -> pd.Series:
    numeric = pd.to_numeric(col, errors="coerce")
    bad = col[numeric.isna()]
    if len(bad):
        raise ValueError(f"{where}: regression labels must be numbers, found {bad.tolist()[:5]} "
                         f"in column {col.name!r}")
    return numeric.astype(np.float32)


def _answers(col: pd.Series, task: Task, where: str) -> pd.Series:
    def norm(a) -> dict:
        if not isinstance(a, Mapping) or "text" not in a or "answer_start" not in a:
            raise ValueError(f"{where}: answers must be dicts with 'text' and 'answer_start', "
                             f"got {a!r}")
        return {"text": [str(t) for t in a["text"]],
                "answer_start": [int(s) for s in a["answer_start"]]}

    out = col.map(norm)
    n_empty = int(sum(len(a["text"]) == 0 for a in out))
    if n_empty and not task.squad_v2:
        raise ValueError(f"{where}: {n_empty} questions have no answer; SQuAD v1.1 needs one "
                         "(use task 'squad_v2' for unanswerable questions)")
    return out


def _subsample(df: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    if max_samples is None or max_samples >= len(df):
        return df
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all rows), got {max_samples}")
    keep = np.sort(np.random.default_rng(seed).choice(len(df), size=max_samples, replace=False))
    out = df.iloc[keep].reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out
