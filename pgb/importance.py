"""Per-weight importance of every encoder matrix, from a calibration sample of the task.

- ``fisher`` (default): diagonal empirical Fisher of the task loss,
  s_ij = sum over calibration batches of (w_ij * dL/dw_ij)^2.
- ``magnitude``: |w_ij|.
- ``activation``: |w_ij| * ||x_j||, x_j the j-th input of the matrix over the calibration
  tokens (padding excluded), as in Wanda.

Scores come back as ``{"<layer>.<role>": tensor (out, in)}`` on the CPU in float64. Under
``torch.distributed`` every rank passes the whole calibration sample, scores its own shard
of it (``distributed.shard``) and the sums are all-reduced, so every rank ends with the
scores of the whole sample.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import MATRICES, dims_of, get_matrix
from .distributed import all_reduce_sum, shard
from .pieces import each_piece
from .trace import TeacherTrace

log = logging.getLogger(__name__)
METHODS = ("fisher", "magnitude", "activation")


def matrix_names(model: nn.Module) -> list[str]:
    """``"<layer>.<role>"`` for every prunable matrix, in layer order."""
    return [f"{layer}.{role}" for layer in range(dims_of(model).layers) for role in MATRICES]


def _linear(model: nn.Module, name: str) -> nn.Linear:
    layer, role = name.split(".")
    return get_matrix(model, int(layer), role)


def importance_scores(model: nn.Module, batches: Iterable[dict], method: str = "fisher",
                      progress: bool = True, trace: TeacherTrace | None = None
                      ) -> dict[str, torch.Tensor]:
    """Importance of every weight of every encoder matrix (see module docstring).

    ``trace`` (a :class:`pgb.trace.TeacherTrace` of ``model``): record the activations
    compensation needs during the passes over ``batches`` (fisher and activation; within
    the trace's memory budget), so that compensation need not run the teacher again."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {METHODS}")
    names = matrix_names(model)
    batches = shard(batches)  # this rank's share; the sums below are all-reduced
    record = trace.recording() if trace is not None and method != "magnitude" and \
        trace.fits(list(batches)) else contextlib.nullcontext()
    if method == "magnitude":
        scores = {n: _linear(model, n).weight.detach().abs().double().cpu() for n in names}
    elif method == "activation":
        with record:
            scores = _activation_scores(model, names, batches, progress)
    else:
        with record:
            scores = _fisher_scores(model, names, batches, progress)
    check_finite(scores, "importance scores")
    return scores


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise when any tensor holds NaN or inf (a diverged model or corrupted data)."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} of {name} contain NaN or inf; the model or the "
                             "calibration data is broken (check the checkpoint and the labels)")


def _fisher_scores(model, names, batches, progress) -> dict[str, torch.Tensor]:
    weights = {n: _linear(model, n).weight for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # gradients only where scores are needed
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    sums = {n: torch.zeros(w.shape, dtype=torch.float64, device=w.device)
            for n, w in weights.items()}
    was_training = model.training
    model.eval()  # no dropout: scores are a deterministic function of the sample
    try:
        for batch in tqdm(batches, desc="importance (fisher)", disable=not progress):
            grads = _batch_gradient(model, _to(batch, model), list(weights.values()))
            for (n, w), g in zip(weights.items(), grads, strict=True):
                wg = w.detach() * g  # squared and summed in float64, no float64 temporary
                sums[n].addcmul_(wg, wg)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    for s in sums.values():  # one at a time: no second copy of all the sums
        all_reduce_sum(s)
    return {n: s.cpu() for n, s in sums.items()}


def _batch_gradient(model: nn.Module, batch: dict, weights: list) -> list[torch.Tensor]:
    """Gradient of the batch's loss, run as length-sorted pieces with less padding (the
    same gradient up to float rounding: see :mod:`pgb.pieces`)."""
    total = None
    for piece, share, _ in each_piece(batch):
        loss = model(**piece).loss
        grads = torch.autograd.grad(loss if share == 1 else loss * share, weights)
        total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads,
                                                                             strict=True)]
    return total


def _activation_scores(model, names, batches, progress) -> dict[str, torch.Tensor]:
    sq = {}
    mask_box: list[torch.Tensor] = []

    def hook(name):
        def fn(_module, args):
            x = args[0].detach()
            keep = mask_box[0].reshape(-1).bool() if mask_box else None
            x = x.reshape(-1, x.shape[-1])
            x = x[keep] if keep is not None and keep.numel() == x.shape[0] else x
            sq[name] = sq.get(name, 0) + x.double().pow(2).sum(0)
        return fn

    handles = [_linear(model, n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="importance (activation)", disable=not progress):
                batch = _to(batch, model)
                mask_box[:] = [batch["attention_mask"]] if "attention_mask" in batch else []
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = {}
    for n in names:
        w = _linear(model, n).weight.detach()
        total = sq.get(n, w.new_zeros(w.shape[1], dtype=torch.float64))  # empty shard: 0
        all_reduce_sum(total)
        scores[n] = (w.abs().double() * total.sqrt().unsqueeze(0)).cpu()
    return scores


def _to(batch: dict, model: nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
