"""Task data shared by every stage: the training split encoded once, batched on demand.

The full split is tokenized only when a stage needs all of it (re-finetuning): a one-shot
compression tokenizes just its calibration sample (on SQuAD: 1,024 of 87,599 examples).
"""

from __future__ import annotations

import numpy as np

from .data import load_split
from .features import EncodedSplit, encode, length_order, make_loader
from .tasks import Task
from .teacher_cache import TeacherOutputs


class TaskData:
    """Training-split features of a task, encoded once and shared by every stage."""

    def __init__(self, task: Task, tokenizer, data_dir=None, files=None, max_length: int = 128,
                 max_samples: int | None = None, seed: int = 0):
        self.task, self.tokenizer, self.data_dir, self.files = task, tokenizer, data_dir, files
        df = load_split(task, "train", data_dir=data_dir, files=files,
                        max_samples=max_samples, seed=seed)
        self.length = max(max_length, 384) if task.kind == "qa" else max_length
        self.train_df = df
        self.teacher_metrics: dict | None = None  # known dev metrics of the teacher, if any
        self.max_eval_samples: int | None = None  # dev metrics on a seeded subset of this size
        self._train: EncodedSplit | None = None
        self._samples: dict[tuple[int, int], EncodedSplit] = {}  # calibration samples
        self._teacher_outputs: dict[tuple, TeacherOutputs] = {}
        self.share_teacher_outputs = False  # set by a sweep: later budgets reuse them

    @property
    def train(self) -> EncodedSplit:
        """The whole training split, encoded on first use."""
        if self._train is None:
            self._train = encode(self.task, self.train_df, self.tokenizer,
                                 max_length=self.length, train=True)
        return self._train

    def calibration(self, samples: int, batch_size: int, seed: int,
                    by_length: bool = False) -> list[dict]:
        """A seeded sample of training features, as a fixed list of batches.

        Classification: one feature per example, so the sample is the same whether or not
        the whole split was encoded. QA (several windows per long context): the seeded
        examples are encoded, then ``samples`` of their windows are drawn.

        ``by_length`` orders the same sample by length before batching, so that batches
        carry little padding: for sums over tokens (compensation), which do not depend on
        how tokens are batched. Batch-level statistics (Fisher scores) keep the seeded
        order.
        """
        key = (samples, seed)
        if key not in self._samples:
            self._samples[key] = self._sample(samples, seed)
        sub = self._samples[key]
        if by_length:
            sub = _subset(sub, length_order(sub))
        return list(make_loader(sub, batch_size=batch_size, shuffle=False))

    def _sample(self, samples: int, seed: int) -> EncodedSplit:
        rng = np.random.default_rng(seed)
        if self._train is not None:  # already encoded: draw features
            return _subset(self._train, _draw(rng, len(self._train), samples))
        rows = _draw(rng, len(self.train_df), samples)
        enc = encode(self.task, self.train_df.iloc[rows], self.tokenizer,
                     max_length=self.length, train=True)
        if self.task.kind != "qa":  # one feature per example: the same draw as above
            return enc
        return _subset(enc, _draw(rng, len(enc), samples))

    def epoch_batches(self, batch_size: int, seed: int):
        """make_batches(epoch) for ``finetune.train``: a seeded shuffle per epoch."""
        return lambda epoch: list(make_loader(self.train, batch_size, shuffle=True,
                                              seed=seed * 1000 + epoch))

    def teacher_outputs(self, teacher, folder=None) -> TeacherOutputs:
        """The teacher's outputs on the re-finetuning batches, shared by every budget
        compressed from this data while ``share_teacher_outputs`` is set (a sweep);
        ``folder`` persists them across runs. Otherwise nothing is kept."""
        if not self.share_teacher_outputs:
            return TeacherOutputs(teacher, folder, keep=False)
        key = (id(teacher), None if folder is None else str(folder))
        if key not in self._teacher_outputs:  # the value holds the teacher: ids stay unique
            self._teacher_outputs[key] = TeacherOutputs(teacher, folder)
        return self._teacher_outputs[key]


def _draw(rng: np.random.Generator, n: int, samples: int) -> np.ndarray:
    """``samples`` sorted indices out of ``n`` (all of them when fewer)."""
    return np.sort(rng.permutation(n)[:min(samples, n)])


def _subset(enc: EncodedSplit, idx: np.ndarray) -> EncodedSplit:
    inputs = {k: [v[i] for i in idx] for k, v in enc.inputs.items()}
    return type(enc)(task=enc.task, inputs=inputs, pad_token_id=enc.pad_token_id,
                     padding_side=enc.padding_side, num_examples=len(idx))
