"""ONNX export of a (compressed) model, checked against PyTorch in onnxruntime.

Inputs are ``input_ids`` and ``attention_mask`` with dynamic batch and sequence axes;
outputs are the model's logits (``logits``, or ``start_logits``/``end_logits`` for QA).
The compact grouped layers export through their plain-op path, so the ONNX file runs in
any onnxruntime with no custom operator.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
INPUTS = ("input_ids", "attention_mask")


def _outputs(model: nn.Module) -> list[str]:
    return ["start_logits", "end_logits"] if "QuestionAnswering" in type(model).__name__ \
        else ["logits"]


class _Logits(nn.Module):
    """Wraps a transformers model so that it returns a plain tuple of logits tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.names = model, _outputs(model)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return tuple(getattr(out, n) for n in self.names)


def export_onnx(model: nn.Module, path: str | Path, opset: int = 18) -> Path:
    """Write ``model`` to ``path`` as ONNX (atomically: temp file, then rename)."""
    from .bench import dummy_batch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Logits(model.eval().cpu())
    batch = dummy_batch(model, 2, 16, "cpu")
    args = tuple(batch[k] for k in INPUTS)
    names = _outputs(model)
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS} | {n: {0: "batch"} for n in names}
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad():
        torch.onnx.export(wrapped, args, str(tmp), input_names=list(INPUTS),
                          output_names=names, dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    os.replace(tmp, path)
    return path


def verify_onnx(model: nn.Module, path: str | Path, batch_size: int = 3,
                seq_len: int = 23) -> float:
    """Max absolute difference between onnxruntime and PyTorch outputs on a fresh batch."""
    import onnxruntime as ort

    from .bench import dummy_batch

    batch = dummy_batch(model, batch_size, seq_len, "cpu")
    batch["attention_mask"][0, seq_len // 2:] = 0  # exercise padding
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: batch[k].numpy() for k in INPUTS})
    with torch.no_grad():
        want = _Logits(model.eval().cpu())(*(batch[k] for k in INPUTS))
    return float(max(np.abs(g - w.numpy()).max() for g, w in zip(got, want, strict=True)))
