"""TaskData: the whole training split is encoded only when a stage needs it, and the
calibration sample does not depend on whether it was."""

import torch
from transformers import AutoTokenizer

from pgb.taskdata import TaskData
from pgb.tasks import get_task


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def test_calibration_sample_is_the_same_with_or_without_the_full_encoding(shared_data,
                                                                         minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    lazy = TaskData(get_task("mrpc"), tok, shared_data, max_samples=300, seed=0)
    calib = lazy.calibration(64, batch_size=16, seed=3)
    assert lazy._train is None  # one-shot compression never tokenizes the whole split
    full = TaskData(get_task("mrpc"), tok, shared_data, max_samples=300, seed=0)
    assert len(full.train) == 300
    assert _same_batches(calib, full.calibration(64, batch_size=16, seed=3))
    assert sum(len(b["labels"]) for b in calib) == 64


def test_qa_calibration_draws_windows_from_seeded_examples(shared_data, minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    data = TaskData(get_task("squad"), tok, shared_data, max_samples=200, seed=0)
    first = data.calibration(48, batch_size=16, seed=1)
    assert data._train is None
    assert sum(len(b["input_ids"]) for b in first) == 48
    assert {"start_positions", "end_positions"} <= set(first[0])
    assert _same_batches(first, data.calibration(48, batch_size=16, seed=1))
    assert not _same_batches(first, data.calibration(48, batch_size=16, seed=2))


def test_by_length_batches_hold_the_same_sample_with_less_padding(shared_data, minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    data = TaskData(get_task("mrpc"), tok, shared_data, max_samples=300, seed=0)
    plain = data.calibration(96, batch_size=16, seed=3)
    ordered = data.calibration(96, batch_size=16, seed=3, by_length=True)

    def rows(batches):  # every example's unpadded tokens and label
        return sorted((tuple(ids[m.bool()].tolist()), int(y)) for b in batches
                      for ids, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"],
                                           strict=True))

    def padded(batches):
        return sum(b["input_ids"].numel() for b in batches)

    assert rows(ordered) == rows(plain)
    assert padded(ordered) < padded(plain)
    lengths = [int(m.sum()) for b in ordered for m in b["attention_mask"]]
    assert lengths == sorted(lengths)
