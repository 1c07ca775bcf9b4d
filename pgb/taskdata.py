"""Task data shared by every stage: the training split encoded once, batched on demand."""

from __future__ import annotations

import numpy as np

from .data import load_split
from .features import EncodedSplit, encode, make_loader
from .tasks import Task


class TaskData:
    """Training-split features of a task, encoded once and shared by every stage."""

    def __init__(self, task: Task, tokenizer, data_dir=None, files=None, max_length: int = 128,
                 max_samples: int | None = None, seed: int = 0):
        self.task, self.tokenizer, self.data_dir, self.files = task, tokenizer, data_dir, files
        df = load_split(task, "train", data_dir=data_dir, files=files,
                        max_samples=max_samples, seed=seed)
        length = max(max_length, 384) if task.kind == "qa" else max_length
        self.train_df = df
        self.teacher_metrics: dict | None = None  # known dev metrics of the teacher, if any
        self.train = encode(task, df, tokenizer, max_length=length, train=True)

    def calibration(self, samples: int, batch_size: int, seed: int) -> list[dict]:
        """A seeded sample of training features, as a fixed list of batches."""
        n = len(self.train)
        pick = np.sort(np.random.default_rng(seed).permutation(n)[:min(samples, n)])
        sub = _subset(self.train, pick)
        return list(make_loader(sub, batch_size=batch_size, shuffle=False))

    def epoch_batches(self, batch_size: int, seed: int):
        """make_batches(epoch) for ``finetune.train``: a seeded shuffle per epoch."""
        return lambda epoch: list(make_loader(self.train, batch_size, shuffle=True,
                                              seed=seed * 1000 + epoch))


def _subset(enc: EncodedSplit, idx: np.ndarray) -> EncodedSplit:
    inputs = {k: [v[i] for i in idx] for k, v in enc.inputs.items()}
    return type(enc)(task=enc.task, inputs=inputs, pad_token_id=enc.pad_token_id,
                     padding_side=enc.padding_side, num_examples=len(idx))
