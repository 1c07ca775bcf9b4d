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
