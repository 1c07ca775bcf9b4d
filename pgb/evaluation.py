"""Metrics and model evaluation for every task in :mod:`pgb.tasks`.

GLUE metrics are on the 0-1 scale (accuracy, F1 of class 1, Matthews correlation, Pearson,
Spearman); SQuAD exact match and F1 are on the official 0-100 scale, with the official answer
normalisation (lowercase, no punctuation, no articles a/an/the, single spaces).

Example::

    >>> compute_metrics(get_task("mrpc"), [1, 0, 1, 1], [1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
"""

from __future__ import annotations

import collections
import logging
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from tqdm.auto import tqdm

from pgb.data import load_split
from pgb.features import EncodedSplit, encode, length_order, make_loader
from pgb.tasks import Task

logger = logging.getLogger(__name__)

QA_MAX_LENGTH, QA_DOC_STRIDE, GLUE_MAX_LENGTH = 384, 128, 128
MODEL_TARGETS = ("labels", "start_positions", "end_positions")
_PUNCTUATION = frozenset(string.punctuation)


def _accuracy(p: np.ndarray, r: np.ndarray) -> float:
    return float(np.mean(p == r))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": lambda p, r: float(f1_score(r, p, pos_label=1, average="binary", zero_division=0)),
    "f1_macro": lambda p, r: float(f1_score(r, p, average="macro", zero_division=0)),
    "mcc": lambda p, r: float(matthews_corrcoef(r, p)),
    "pearson": lambda p, r: float(pearsonr(p, r)[0]),
    "spearman": lambda p, r: float(spearmanr(p, r)[0]),
}


def compute_metrics(task: Task, predictions, references) -> dict[str, float]:
    """GLUE-style metrics of ``predictions`` (class ids or scores) against ``references``.

    Computes every metric in ``task.metrics``; MNLI's ``accuracy_mm`` is plain accuracy on the
    mismatched split, so it is returned as ``accuracy`` here and renamed by :func:`evaluate`.
    """
    if task.kind == "qa":
        raise ValueError("QA predictions are answer texts: use squad_metrics, not compute_metrics")
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"predictions and references must be equal-length non-empty 1-D arrays, "
                         f"got shapes {p.shape} and {r.shape}")
    names = dict.fromkeys(m.removesuffix("_mm") for m in task.metrics)
    return {name: METRICS[name](p, r) for name in names}


# ----------------------------------------------------------------------------- SQuAD


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lowercase, drop punctuation and articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str, v2: bool) -> float:
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if v2 and (not pred_toks or not gold_toks):  # official v2: no-answer scores 1 iff both empty
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(
    predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]], v2: bool = False
) -> dict[str, float]:
    """Official SQuAD exact match and F1 (0-100), max over the gold answers of each question.

    Every question in ``answers`` counts; a missing prediction scores 0. With ``v2=True`` an
    unanswerable question (no gold answer text) expects the empty prediction ``""``.
    """
    if not answers:
        raise ValueError("answers is empty: nothing to score")
    exact = f1 = 0.0
    for qid, golds in answers.items():
        golds = [g for g in golds if normalize_answer(g)] if v2 else list(golds)
        golds = golds or [""]
        pred = predictions.get(qid, "")
        exact += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_f1(pred, g, v2) for g in golds)
    return {"exact_match": 100.0 * exact / len(answers), "f1": 100.0 * f1 / len(answers)}


def postprocess_qa(
    encoded: EncodedSplit,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
    v2: bool = False,
) -> dict[str, str]:
    """Map per-feature start/end logits back to one answer text per example id.

    ``start_logits``/``end_logits``: one row of token logits per feature (a 2-D array padded
    to any width, or a list of 1-D arrays). The best span maximises start + end logit over
    the ``n_best`` top starts and ends of every window of the example, inside the context and
    at most ``max_answer_length`` tokens long. With ``v2=True`` the answer is ``""`` when the
    best (minimum over windows) CLS score beats the best span, as in HF's run_qa.
    """
    if encoded.offsets is None or encoded.example_ids is None:
        raise ValueError("post-processing needs features encoded with train=False")
    if len(start_logits) != len(encoded) or len(end_logits) != len(encoded):
        raise ValueError(f"got {len(start_logits)} start / {len(end_logits)} end logit rows for "
                         f"{len(encoded)} features")
    best: dict[str, tuple[float, str]] = {}
    null: dict[str, float] = {}
    for i, qid in enumerate(encoded.example_ids):
        offs = encoded.offsets[i]
        s_log = np.asarray(start_logits[i], dtype=np.float64)[: len(offs)]
        e_log = np.asarray(end_logits[i], dtype=np.float64)[: len(offs)]
        null[qid] = min(null.get(qid, np.inf), s_log[0] + e_log[0])
        span = _best_span(s_log, e_log, offs, n_best, max_answer_length)
        if span is not None and span[0] > best.get(qid, (-np.inf, ""))[0]:
            text = encoded.contexts[qid][offs[span[1]][0]: offs[span[2]][1]]
            best[qid] = (span[0], text)
    out = {}
    for qid in dict.fromkeys(encoded.example_ids):
        score, text = best.get(qid, (-np.inf, ""))
        out[qid] = "" if v2 and null[qid] > score else text
    return out


def _best_span(s_log: np.ndarray, e_log: np.ndarray, offs, n_best: int, max_len: int):
    """(score, start, end) of the best valid span in one window, or None."""
    best = None
    for s in np.argsort(s_log)[::-1][:n_best]:
        if offs[s] is None:
            continue
        for e in np.argsort(e_log)[::-1][:n_best]:
            if offs[e] is None or e < s or e - s + 1 > max_len:
                continue
            score = float(s_log[s] + e_log[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


# ----------------------------------------------------------------------------- models


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    task: Task,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    files: Mapping[str, str] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a sequence-classification or QA model on ``task`` and return its metrics.

    Splits default to ``task.eval_splits``; metrics of MNLI's ``validation_mismatched`` get an
    ``_mm`` suffix (``accuracy_mm``). ``samples`` (``samples_mm``) counts the examples scored.
    ``device`` is where batches go (default: the model's device). The model's train/eval mode
    is restored afterwards.
    """
    splits = (split,) if split else task.eval_splits
    device = torch.device(device) if device is not None else _model_device(model)
    max_length = max_length or (QA_MAX_LENGTH if task.kind == "qa" else GLUE_MAX_LENGTH)
    was_training = model.training
    model.eval()
    try:
        results: dict[str, float] = {}
        for name in splits:
            df = load_split(task, name, data_dir=data_dir, files=files, max_samples=max_samples)
            encoded = encode(task, df, tokenizer, max_length=max_length, train=False,
                             doc_stride=QA_DOC_STRIDE)
            metrics = _evaluate_encoded(model, encoded, batch_size, device,
                                        desc=f"eval {task.name}/{name}", progress=progress)
            suffix = "_mm" if name.endswith("mismatched") else ""
            results.update({f"{k}{suffix}": v for k, v in metrics.items()})
        return results
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _evaluate_encoded(model, encoded: EncodedSplit, batch_size: int, device, desc: str,
                      progress: bool) -> dict[str, float]:
    task = encoded.task
    outputs: list[list[np.ndarray]] = [[], []]
    # batches of similar lengths carry little padding (SQuAD windows: 384 tokens at most,
    # many far shorter); predictions go back to feature order below
    order = length_order(encoded)
    loader = make_loader(encoded, batch_size, order=order)
    for batch in tqdm(loader, desc=desc, disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items() if k not in MODEL_TARGETS}
        out = model(**batch)
        if task.kind == "qa":  # keep one row per feature: widths differ between batches
            outputs[0].extend(out.start_logits.float().cpu().numpy())
            outputs[1].extend(out.end_logits.float().cpu().numpy())
        else:
            logits = out.logits.float().cpu()  # (B, num_labels)
            pred = logits[:, 0] if task.kind == "regression" else logits.argmax(-1)
            outputs[0].append(pred.numpy())
    if task.kind == "qa":
        starts, ends = [None] * len(order), [None] * len(order)
        for row, i in enumerate(order):
            starts[i], ends[i] = outputs[0][row], outputs[1][row]
        answers = postprocess_qa(encoded, starts, ends, v2=task.squad_v2)
        metrics = squad_metrics(answers, encoded.answers, v2=task.squad_v2)
    else:
        sorted_preds = np.concatenate(outputs[0])
        preds = np.empty_like(sorted_preds)
        preds[order] = sorted_preds
        metrics = compute_metrics(task, preds, encoded.labels)
    return {**metrics, "samples": encoded.num_examples}
