"""Loading splits: HF-schema files, original GLUE TSVs, SQuAD JSON, custom files, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pgb.data import (
    flatten_squad,
    label_names_of,
    load_split,
    read_table_file,
    resolve_data_dir,
    with_data_labels,
)
from pgb.tasks import TASKS, custom_task, get_task

GLUE = [name for name, t in TASKS.items() if t.kind != "qa"]


def write_tsv(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def hf_frame(task_name: str, n: int = 6) -> pd.DataFrame:
    task = get_task(task_name)
    data = {c: [f"{c} number {i}" for i in range(n)] for c in task.text_columns}
    if task.kind == "regression":
        data["label"] = np.linspace(0, 5, n).astype(np.float32)
    else:
        data["label"] = [i % task.num_labels for i in range(n)]
    data["idx"] = list(range(n))
    return pd.DataFrame(data)


def squad_json(v2: bool = False) -> dict:
    ctx = "The cat sat on the mat. Paris is the capital of France."
    qas = [
        {"id": "q1", "question": "Where did the cat sit?",
         "answers": [{"text": "on the mat", "answer_start": 12},
                     {"text": "the mat", "answer_start": 15}]},
        {"id": "q2", "question": "What is the capital of France?",
         "answers": [{"text": "Paris", "answer_start": 24}]},
    ]
    if v2:
        qas.append({"id": "q3", "question": "What is the capital of Mars?", "answers": [],
                    "is_impossible": True})
    return {"version": "2.0" if v2 else "1.1",
            "data": [{"title": "T", "paragraphs": [{"context": ctx, "qas": qas}]}]}


# ----------------------------------------------------------------------------- HF-schema files


@pytest.mark.parametrize("name", GLUE)
def test_hf_parquet_every_glue_task(tmp_path, name):
    task = get_task(name)
    split = task.eval_splits[-1]  # mnli: validation_mismatched
    (tmp_path / name).mkdir()
    hf_frame(name).to_parquet(tmp_path / name / f"{split}.parquet")
    df = load_split(task, split, data_dir=tmp_path)
    assert list(df.columns) == [*task.text_columns, "label", "idx"]
    assert len(df) == 6
    if task.kind == "regression":
        assert df["label"].dtype == np.float32
    else:
        assert df["label"].dtype == np.int64
        assert df["label"].tolist() == [i % task.num_labels for i in range(6)]
        assert label_names_of(df) == task.label_names


def test_data_dir_can_be_the_task_folder_and_jsonl_gz(tmp_path):
    with gzip.open(tmp_path / "validation.jsonl.gz", "wt") as fh:
        hf_frame("sst2", 3).to_json(fh, orient="records", lines=True)
    df = load_split(get_task("sst2"), "validation", data_dir=tmp_path)
    assert df["sentence"].tolist() == ["sentence number 0", "sentence number 1",
                                       "sentence number 2"]


def test_data_dir_from_env(tmp_path, monkeypatch):
    (tmp_path / "cola").mkdir()
    hf_frame("cola", 4).to_csv(tmp_path / "cola" / "train.csv", index=False)
    monkeypatch.setenv("PGB_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")
    assert len(load_split(get_task("cola"), "train")) == 4
    monkeypatch.delenv("PGB_DATA_DIR")
    assert resolve_data_dir(None) is None


# ----------------------------------------------------------------------------- GLUE TSVs


def test_glue_tsv_cola_has_no_header(tmp_path):
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub \"dry.",
    ])
    df = load_split(get_task("cola"), "validation", data_dir=tmp_path)
    assert df["label"].tolist() == [1, 0]
    assert df["sentence"].tolist()[1] == 'They drank the pub "dry.'  # unbalanced quote kept
    assert df["idx"].tolist() == [0, 1]


def test_glue_tsv_sst2_when_data_dir_is_the_glue_folder(tmp_path):
    folder = tmp_path / "SST-2"
    write_tsv(folder / "train.tsv", ["sentence\tlabel", "a \" charming film \t1", "dull \t0",
                                     "fine\t1"])
    df = load_split(get_task("sst2"), "train", data_dir=folder)
    assert (len(df), df["label"].tolist()) == (3, [1, 0, 1])
    assert df["sentence"][0] == 'a " charming film '


def test_glue_tsv_mrpc_bom_header(tmp_path):
    write_tsv(tmp_path / "MRPC" / "train.tsv", [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused .",
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .",
    ], bom=True)
    df = load_split(get_task("mrpc"), "train", data_dir=tmp_path)
    assert list(df.columns) == ["sentence1", "sentence2", "label", "idx"]
    assert df["label"].tolist() == [1, 0]
    assert df["sentence2"][1] == "Yucaipa bought Dominick 's ."


def test_glue_tsv_stsb_scores_are_float(tmp_path):
    header = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
              "sentence2\tscore")
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [
        header,
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man plays.\tA man sings.\t1.600",
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA dog.\tA dog runs.\t5.000",
    ])
    df = load_split(get_task("stsb"), "validation", data_dir=tmp_path)
    assert df["label"].dtype == np.float32
    assert df["label"].tolist() == pytest.approx([1.6, 5.0])
    assert df["sentence1"].tolist() == ["A man plays.", "A dog."]


def test_glue_tsv_qqp(tmp_path):
    write_tsv(tmp_path / "QQP" / "dev.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics "
        "so beautiful?\t0",
        "263843\t69383\t380476\tI want to pursue PhD?\tHow do I get a PhD?\t1",
        "17\t1\t2\ttruncated row",  # too few fields: skipped, as in GLUE's loaders
    ])
    df = load_split(get_task("qqp"), "validation", data_dir=tmp_path)
    assert df["label"].tolist() == [0, 1]
    assert df["question2"][1] == "How do I get a PhD?"


def test_glue_tsv_mnli_matched_and_mismatched(tmp_path):
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
              "label4\tlabel5\tgold_label")

    def row(i, s1, s2, gold):
        return f"{i}\t1\t1n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s1}\t{s2}\t" \
               f"{gold}\t{gold}\t{gold}\t{gold}\t{gold}\t{gold}"

    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [
        header, row(0, "P0", "H0", "contradiction"), row(1, "P1", "H1", "neutral"),
        row(2, "P2", "H2", "entailment")])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", [header, row(0, "Q", "R", "neutral")])
    mnli = get_task("mnli")
    matched = load_split(mnli, "validation_matched", data_dir=tmp_path)
    assert list(matched.columns) == ["premise", "hypothesis", "label", "idx"]
    assert matched["label"].tolist() == [2, 1, 0]
    mismatched = load_split(mnli, "validation_mismatched", data_dir=tmp_path)
    assert (mismatched["premise"].tolist(), mismatched["label"].tolist()) == (["Q"], [1])


@pytest.mark.parametrize(("name", "folder", "header", "labels", "ids"), [
    ("qnli", "QNLI", "index\tquestion\tsentence\tlabel", ["entailment", "not_entailment"], [0, 1]),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel", ["not_entailment", "entailment"], [1, 0]),
    ("wnli", "WNLI", "index\tsentence1\tsentence2\tlabel", ["1", "0"], [1, 0]),
])
def test_glue_tsv_pair_tasks_map_label_strings(tmp_path, name, folder, header, labels, ids):
    write_tsv(tmp_path / folder / "train.tsv",
              [header] + [f"{i}\tfirst {i}\tsecond {i}\t{lab}" for i, lab in enumerate(labels)])
    task = get_task(name)
    df = load_split(task, "train", data_dir=tmp_path)
    assert df["label"].tolist() == ids
    assert df[task.text_columns[1]].tolist() == ["second 0", "second 1"]


# ----------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize("gz", [False, True])
def test_squad_json_plain_and_gz(tmp_path, gz):
    folder = tmp_path / "squad_v1.1"
    folder.mkdir()
    name = "dev-v1.1.json" + (".gz" if gz else "")
    opener = gzip.open if gz else open
    with opener(folder / name, "wt") as fh:
        json.dump(squad_json(), fh)
    df = load_split(get_task("squad"), "validation", data_dir=tmp_path)
    assert df["id"].tolist() == ["q1", "q2"]
    assert list(df.columns) == ["id", "title", "context", "question", "answers"]
    assert df["answers"][0] == {"text": ["on the mat", "the mat"], "answer_start": [12, 15]}
    ctx = df["context"][1]
    assert ctx[24:29] == "Paris"


def test_squad_versions_pick_their_own_files(tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "train-v1.1.json").write_text(json.dumps(squad_json()))
    (tmp_path / "squad" / "train-v2.0.json").write_text(json.dumps(squad_json(v2=True)))
    assert len(load_split(get_task("squad"), "train", data_dir=tmp_path)) == 2
    v2 = load_split(get_task("squad_v2"), "train", data_dir=tmp_path)
    assert len(v2) == 3
    assert v2["answers"][2] == {"text": [], "answer_start": []}


def test_squad_v1_rejects_unanswerable(tmp_path):
    (tmp_path / "train-v1.1.json").write_text(json.dumps(squad_json(v2=True)))
    with pytest.raises(ValueError, match="1 questions have no answer.*squad_v2"):
        load_split(get_task("squad"), "train", data_dir=tmp_path)


def test_flatten_squad_one_row_per_question():
    df = flatten_squad(squad_json(v2=True))
    assert len(df) == 3
    assert df["question"][1] == "What is the capital of France?"


# ----------------------------------------------------------------------------- custom files


def test_custom_csv_string_labels_use_train_mapping(tmp_path):
    pd.DataFrame({"text": ["x", "y", "z", "w"], "y": ["pos", "neg", "neutral", "pos"]}).to_csv(
        tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": ["u", "v"], "y": ["pos", "pos"]}).to_json(
        tmp_path / "dev.jsonl", orient="records", lines=True)
    files = {"train": tmp_path / "train.csv", "validation": tmp_path / "dev.jsonl"}
    task = custom_task(["text"], "y")
    train = load_split(task, "train", files=files)
    assert label_names_of(train) == ("neg", "neutral", "pos")
    assert train["y"].tolist() == [2, 0, 1, 2]
    val = load_split(task, "validation", files=files)
    assert val["y"].tolist() == [2, 2]  # ids from the train split, not from {"pos"} alone
    resolved = with_data_labels(task, train)
    assert (resolved.num_labels, resolved.label_names) == (3, ("neg", "neutral", "pos"))


def test_custom_parquet_int_labels_and_gz_csv(tmp_path):
    pd.DataFrame({"a": ["p", "q", "r"], "b": ["s", "t", "u"], "lab": [0, 3, 1]}).to_parquet(
        tmp_path / "t.parquet")
    task = custom_task(["a", "b"], "lab")
    df = load_split(task, "train", files={"train": str(tmp_path / "t.parquet")})
    assert (df["lab"].tolist(), label_names_of(df)) == ([0, 3, 1], None)
    assert with_data_labels(task, df).num_labels == 4
    pd.DataFrame({"t": ["a", "NA"], "s": [0.5, 2]}).to_csv(tmp_path / "r.csv.gz", index=False)
    reg = load_split(custom_task(["t"], "s", kind="regression"), "train",
                     files={"train": tmp_path / "r.csv.gz"})
    assert reg["s"].dtype == np.float32
    assert reg["t"].tolist() == ["a", "NA"]  # "NA" is text, not a missing value


def test_max_samples_is_a_seeded_subset_in_original_order(tmp_path):
    (tmp_path / "sst2").mkdir()
    hf_frame("sst2", 50).to_parquet(tmp_path / "sst2" / "train.parquet")
    task = get_task("sst2")
    a = load_split(task, "train", data_dir=tmp_path, max_samples=10, seed=1)
    b = load_split(task, "train", data_dir=tmp_path, max_samples=10, seed=1)
    c = load_split(task, "train", data_dir=tmp_path, max_samples=10, seed=2)
    assert len(a) == 10
    assert a["idx"].tolist() == b["idx"].tolist() != c["idx"].tolist()
    assert a["idx"].tolist() == sorted(a["idx"].tolist())
    assert label_names_of(a) == task.label_names
    assert len(load_split(task, "train", data_dir=tmp_path, max_samples=500)) == 50
    with pytest.raises(ValueError, match="max_samples must be >= 1.*got 0"):
        load_split(task, "train", data_dir=tmp_path, max_samples=0)


# ----------------------------------------------------------------------------- errors


def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder .*nope does not exist.*sst2/"):
        load_split(get_task("sst2"), "train", data_dir=tmp_path / "nope")


def test_error_missing_split_lists_files(tmp_path):
    (tmp_path / "sst2").mkdir()
    hf_frame("sst2").to_parquet(tmp_path / "sst2" / "train.parquet")
    with pytest.raises(FileNotFoundError, match=r"no 'test' split .*sst2/train.parquet"):
        load_split(get_task("sst2"), "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"files has splits \['train'\]"):
        load_split(get_task("sst2"), "validation", files={"train": "x.csv"})


def test_error_missing_column(tmp_path):
    hf_frame("mrpc").drop(columns="sentence2").to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence2'\]; columns found: "
                                         r"\['sentence1', 'label', 'idx'\]"):
        load_split(get_task("rte"), "train", data_dir=tmp_path)


def test_error_test_split_labels_minus_one(tmp_path):
    frame = hf_frame("sst2").assign(label=-1)
    frame.to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"\[0, 2\), found \[-1\].*hidden test labels"):
        load_split(get_task("sst2"), "test", data_dir=tmp_path)


def test_error_out_of_range_and_unknown_labels(tmp_path):
    hf_frame("sst2").assign(label=[0, 1, 2, 5, 0, 1]).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"found \[2, 5\]. Fix the labels or set num_labels"):
        load_split(get_task("sst2"), "train", data_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv",
              ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(ValueError, match=r"\['maybe'\] are not among the label names"):
        load_split(get_task("rte"), "validation", data_dir=tmp_path)


def test_error_regression_labels_not_numeric(tmp_path):
    pd.DataFrame({"t": ["a"], "s": ["high"]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"regression labels must be numbers, found \['high'\]"):
        load_split(custom_task(["t"], "s", kind="regression"), "train",
                   files={"train": tmp_path / "x.csv"})


def test_error_empty_split_and_unknown_extension(tmp_path):
    hf_frame("sst2").iloc[:0].to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="split 'train' .* is empty"):
        load_split(get_task("sst2"), "train", data_dir=tmp_path)
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match=r"unknown extension \.xlsx"):
        read_table_file(tmp_path / "x.xlsx")


def test_error_offline_without_folder(monkeypatch):
    monkeypatch.delenv("PGB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"task 'sst2' split 'train'.*offline.*no data "
                                                r"folder was given.*--data-dir DIR or set "
                                                r"PGB_DATA_DIR.*DIR/sst2/train.parquet"):
        load_split(get_task("sst2"), "train")
    with pytest.raises(FileNotFoundError, match=r"DIR/squad/dev-v1.1.json"):
        load_split(get_task("squad"), "validation")


# ----------------------------------------------------------------------------- real data


def test_real_sst2_validation(shared_data):
    df = load_split(get_task("sst2"), "validation", data_dir=shared_data)
    assert len(df) == 872
    assert df["label"].value_counts().to_dict() == {1: 444, 0: 428}


def test_real_cola_mrpc_stsb_validation(shared_data):
    cola = load_split(get_task("cola"), "validation", data_dir=shared_data)
    assert cola["label"].value_counts().to_dict() == {1: 721, 0: 322}
    mrpc = load_split(get_task("mrpc"), "validation", data_dir=shared_data)
    assert (len(mrpc), int(mrpc["label"].sum())) == (408, 279)
    stsb = load_split(get_task("stsb"), "validation", data_dir=shared_data)
    assert len(stsb) == 1500
    assert stsb["label"].dtype == np.float32
    assert 0.0 <= stsb["label"].min() and stsb["label"].max() <= 5.0


def test_real_squad_dev(shared_data):
    df = load_split(get_task("squad"), "validation", data_dir=shared_data)
    assert len(df) == 10570
    assert df["title"].nunique() == 48
    assert df["id"].is_unique
    first = df.iloc[0]
    assert first["answers"]["text"][0] == "Denver Broncos"
    start = first["answers"]["answer_start"][0]
    assert first["context"][start:start + len("Denver Broncos")] == "Denver Broncos"
