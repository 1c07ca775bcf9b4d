"""Featurisation: tokenise a loaded split once, then batch it with dynamic padding.

Classification/regression examples become one feature each (single sentence or pair,
truncated, unpadded). SQuAD-style examples become sliding-window features (question first,
context second, ``truncation="only_second"``, ``stride=doc_stride``); a long context yields
several features that share an example id.

Example::

    enc = encode(get_task("sst2"), df, tokenizer)          # len(enc) == len(df)
    for batch in make_loader(enc, batch_size=32):           # dict of (B, T) tensors + labels
        logits = model(**batch).logits                      # (B, num_labels)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pgb.tasks import Task

CHUNK = 4096  # examples per tokenizer call: keeps the progress bar moving on SST-2/SQuAD
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EncodedSplit:
    """Tokenised features of one split, all lists aligned with feature order.

    Attributes:
        task: the task the features belong to.
        inputs: per-feature model inputs: ``input_ids``, ``attention_mask``,
            ``token_type_ids`` (if the tokenizer makes them) and ``labels`` (classification /
            regression, when the split has labels) or ``start_positions``/``end_positions``
            (QA training).
        pad_token_id: id used to pad ``input_ids`` in a batch.
        padding_side: ``"right"`` or ``"left"``, from the tokenizer.
        num_examples: rows of the source split.
        example_ids: QA: the example id of each feature.
        offsets: QA evaluation: per feature and token, the ``(start, end)`` character span in
            the context, ``None`` for question/special/padding tokens.
        contexts: QA: example id -> context text, to cut answers out of.
        answers: QA: example id -> gold answer texts (empty list for unanswerable).
    """

    task: Task
    inputs: Mapping[str, list]
    pad_token_id: int
    padding_side: str
    num_examples: int
    example_ids: list[str] | None = None
    offsets: list[list[tuple[int, int] | None]] | None = None
    contexts: dict[str, str] | None = None
    answers: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.inputs["input_ids"])

    @property
    def labels(self) -> np.ndarray | None:
        """Reference labels in feature order (classification/regression), else ``None``."""
        return np.asarray(self.inputs["labels"]) if "labels" in self.inputs else None


def encode(
    task: Task,
    df: pd.DataFrame,
    tokenizer,
    max_length: int = 128,
    train: bool = True,
    doc_stride: int = 128,
) -> EncodedSplit:
    """Tokenise a split from :func:`pgb.data.load_split` (no padding; see :func:`make_loader`).

    Args:
        task: the task; QA tasks get sliding windows.
        df: the split's rows.
        tokenizer: a Hugging Face tokenizer (fast; QA needs offsets).
        max_length: truncation length in tokens (use 384 for SQuAD).
        train: QA only: True adds start/end positions (0 = CLS when the answer is outside
            the window), False keeps example ids and context offsets for post-processing.
        doc_stride: QA only: tokens shared by consecutive windows of one context.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")
    if task.kind == "qa":
        return _encode_qa(task, df, tokenizer, max_length, train, doc_stride)
    return _encode_text(task, df, tokenizer, max_length)


def _chunks(n: int, desc: str):
    starts = range(0, n, CHUNK)
    return tqdm(starts, desc=desc, unit="chunk", disable=len(starts) < 2, leave=False)


def _token_keys(enc) -> list[str]:
    return [k for k in TOKEN_KEYS if k in enc]


def _encode_text(task: Task, df: pd.DataFrame, tokenizer, max_length: int) -> EncodedSplit:
    texts = [df[c].tolist() for c in task.text_columns]
    inputs: dict[str, list] = defaultdict(list)
    for start in _chunks(len(df), f"tokenize {task.name}"):
        enc = tokenizer(*[t[start:start + CHUNK] for t in texts], truncation=True,
                        max_length=max_length)
        for key in _token_keys(enc):
            inputs[key].extend(enc[key])
    if task.label_column in df.columns:
        dtype = np.float32 if task.kind == "regression" else np.int64
        inputs["labels"] = df[task.label_column].to_numpy(dtype=dtype).tolist()
    return EncodedSplit(task, dict(inputs), tokenizer.pad_token_id, tokenizer.padding_side,
                        num_examples=len(df))


def _encode_qa(task: Task, df: pd.DataFrame, tokenizer, max_length: int, train: bool,
               doc_stride: int) -> EncodedSplit:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("QA featurisation needs a fast tokenizer (offset mappings); load it "
                         "with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if not 0 <= doc_stride < max_length // 2:
        raise ValueError(f"doc_stride must be in [0, max_length/2), got doc_stride={doc_stride} "
                         f"with max_length={max_length}; use max_length=384 and doc_stride=128")
    ids, contexts = df["id"].astype(str).tolist(), df["context"].tolist()
    questions = [q.lstrip() for q in df["question"]]  # leading spaces only waste window room
    answers = df["answers"].tolist()
    inputs: dict[str, list] = defaultdict(list)
    example_ids: list[str] = []
    offsets: list[list[tuple[int, int] | None]] = []
    for start in _chunks(len(df), f"tokenize {task.name}"):
        enc = tokenizer(questions[start:start + CHUNK], contexts[start:start + CHUNK],
                        truncation="only_second", max_length=max_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        for i, j in enumerate(enc["overflow_to_sample_mapping"]):
            for key in _token_keys(enc):
                inputs[key].append(enc[key][i])
            example_ids.append(ids[start + j])
            seq_ids, offs = enc.sequence_ids(i), enc["offset_mapping"][i]
            if train:
                s, e = answer_token_span(offs, seq_ids, answers[start + j])
                inputs["start_positions"].append(s)
                inputs["end_positions"].append(e)
            else:  # keep context offsets only: post-processing must never pick question tokens
                pairs = zip(offs, seq_ids, strict=True)
                offsets.append([tuple(o) if s == 1 else None for o, s in pairs])
    return EncodedSplit(
        task, dict(inputs), tokenizer.pad_token_id, tokenizer.padding_side,
        num_examples=len(df), example_ids=example_ids, offsets=None if train else offsets,
        contexts=dict(zip(ids, contexts, strict=True)),
        answers={i: list(a["text"]) for i, a in zip(ids, answers, strict=True)},
    )


def answer_token_span(
    offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None], answer: Mapping
) -> tuple[int, int]:
    """Token (start, end) of the first gold answer inside one window; (0, 0) = CLS if absent.

    Example: context tokens with offsets ``[(0, 3), (4, 7)]`` at token positions 3 and 4 and
    the answer ``{"text": ["bar"], "answer_start": [4]}`` give ``(4, 4)``.
    """
    if not answer["text"]:  # unanswerable (SQuAD v2)
        return 0, 0
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    ctx = [i for i, s in enumerate(sequence_ids) if s == 1]
    first, last = ctx[0], ctx[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0  # the answer is not fully inside this window
    s = first
    while s <= last and offsets[s][0] <= start_char:
        s += 1
    e = last
    while e >= first and offsets[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


class _Features(Dataset):
    def __init__(self, inputs: Mapping[str, list]):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.inputs.items()}


class PadCollator:
    """Stack features into a batch, padding token lists to the longest in the batch.

    ``input_ids`` pad with ``pad_token_id``; ``attention_mask``/``token_type_ids`` with 0.
    Scalars become int64 tensors (float32 for regression labels).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], list):
                batch[key] = self._pad(values, self.pad_token_id if key == "input_ids" else 0)
            else:
                batch[key] = torch.tensor(values)  # int -> int64, float -> float32
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        longest = max(len(r) for r in rows)
        out = torch.full((len(rows), longest), value, dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                out[i, longest - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
        return out


def make_loader(
    encoded: EncodedSplit, batch_size: int, shuffle: bool = False, seed: int = 0,
    order: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader of model-ready dict batches (``model(**batch)``), padded per batch.

    With ``shuffle=True`` the order comes from a ``torch.Generator`` seeded with ``seed``:
    the same seed gives the same sequence of epochs. ``order`` instead gives the feature
    order explicitly (``length_order``: batches with little padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle and order is not None:
        raise ValueError("pass shuffle=True or an order, not both")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(_Features(encoded.inputs), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, sampler=None if order is None else list(order),
                      collate_fn=PadCollator(encoded.pad_token_id, encoded.padding_side))


def length_order(encoded: EncodedSplit) -> np.ndarray:
    """Feature indices sorted by token count (stable): batches of similar lengths, so
    little padding to compute on."""
    return np.argsort([len(ids) for ids in encoded.inputs["input_ids"]], kind="stable")
