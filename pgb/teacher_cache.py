"""The teacher's outputs on re-finetuning batches, computed once and reused.

Distilling runs the teacher forward on every batch: about 0.5 of the 1.85 s of a
MiniLM-L6 step at S = 0.5 on a 2-core CPU (batch 32, STS-B). Those batches are the same
for every budget of a sparsity sweep and for every method of a benchmark campaign (same
training subset, seed and batch size), and so are the teacher's outputs.
:class:`TeacherOutputs` answers a batch it has seen from memory, and from a file in
``CompressConfig.teacher_cache`` (``--teacher-cache DIR``) across runs.

Exact by construction: an entry is keyed by the bytes of the batch's inputs and the file
by the bytes of the teacher's weights (with the torch version and thread count, which can
change the last bits of a forward pass), so a cached answer is the very tensor the
teacher computed for that batch, and a re-finetune gives the same student with or without
the cache. Hidden-state distillation (``kd_hidden``) bypasses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

log = logging.getLogger(__name__)
OUTPUT_KEYS = ("logits", "start_logits", "end_logits")  # what distillation reads


def _digest(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def batch_key(inputs: dict[str, torch.Tensor]) -> str:
    """A digest of the batch's input tensors (names, dtypes, shapes and values)."""
    h = hashlib.sha1()
    for name in sorted(inputs):
        h.update(name.encode())
        _digest(h, inputs[name])
    return h.hexdigest()


def fingerprint(teacher: nn.Module) -> str:
    """A digest of the teacher's weights, class, torch version and thread count."""
    h = hashlib.sha1(f"{type(teacher).__name__} torch {torch.__version__} "
                     f"threads {torch.get_num_threads()}".encode())
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        _digest(h, tensor)
    return h.hexdigest()


class TeacherOutputs:
    """``outputs(inputs)``: the teacher's distillation outputs for a batch, computed once.

    ``folder``: where the outputs persist between runs (one file per teacher fingerprint);
    None keeps them in memory only. Call :meth:`save` after training. ``keep=False``, with
    no folder, stores nothing: for a single run, whose seeded shuffles never repeat a batch
    (a whole SQuAD epoch's start and end logits would hold about 270 MB for nothing).
    """

    def __init__(self, teacher: nn.Module, folder: str | Path | None = None,
                 keep: bool = True):
        self.teacher = teacher
        self.keep = keep or folder is not None
        self.store: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = 0
        self.path = Path(folder) / f"{fingerprint(teacher)}.pt" if folder else None
        self._stored = 0  # entries the file held when read
        if self.path is not None and self.path.is_file():
            self.store = self._read(self.path)
            self._stored = len(self.store)

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            store = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(store, dict):
                raise TypeError(f"expected a dict, found {type(store).__name__}")
            return store
        except Exception as err:  # a cache: a damaged file costs time, never correctness
            log.warning("ignoring the unreadable teacher-output cache %s (%s); it will be "
                        "rewritten", path, err)
            return {}

    def __call__(self, inputs: dict[str, torch.Tensor]):
        """The teacher's outputs for ``inputs`` (labels excluded), as attributes."""
        key = batch_key(inputs) if self.keep else None  # nothing stored: nothing to look up
        cached = self.store.get(key)
        if cached is not None:
            self.hits += 1
            device = next(iter(inputs.values())).device
            return SimpleNamespace(**{k: v.to(device) for k, v in cached.items()})
        self.misses += 1
        with torch.no_grad():
            out = self.teacher(**inputs)
        if key is None:
            return out
        self.store[key] = {k: getattr(out, k).detach().cpu() for k in OUTPUT_KEYS
                           if getattr(out, k, None) is not None}
        return out

    def save(self) -> None:
        """Write new entries to the file (merged with what it holds now), atomically."""
        if self.path is None or len(self.store) == self._stored:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**(self._read(self.path) if self.path.is_file() else {}), **self.store}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save(merged, tmp)
        os.replace(tmp, self.path)
        self._stored = len(merged)
