"""Baseline methods users compare PGB against: ``magnitude`` and ``structured``.

- ``magnitude``: global unstructured magnitude pruning. One threshold over every encoder
  linear weight (query, key, value, attn_out, ffn_in, ffn_out of all layers) removes
  exactly ``round(sparsity * total)`` weights, the smallest |w| first; shapes stay dense
  and the masks hold through re-finetuning (a weight parametrization), after which the
  model is a plain transformers model with zeros. No compensation.
- ``structured``: Kwon et al. 2022 head and FFN-neuron pruning (``pgb.structured``): mask
  Fisher, selection under the same weight budget, least-squares rescaling, physical
  removal. The result carries ``pgb_structure`` and is saved with ``save_structured``.

Both share PGB's calibration sample, re-finetuning budget and distillation, and return a
report with PGB's keys.

Example::

    >>> cfg = CompressConfig(sparsity=0.5, method="structured")
    >>> result = compress_baseline(teacher, tok, get_task("sst2"), cfg, data)
    >>> result.report["achieved_sparsity"]
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import __version__
from .arch import MATRICES, SUBLAYERS, dims_of, get_matrix
from .checkpoint import round_embeddings
from .config import CompressConfig
from .flops import count_params, flops_ratio
from .pipeline import (
    CompressResult,
    _Clock,
    add_metrics,
    budget_sparsity,
    budget_stage,
    dev_metrics,
    refinetune,
    shared_stage,
)
from .structured import Structure, mask_fisher, rescale, select, shrink
from .taskdata import TaskData
from .tasks import Task

log = logging.getLogger(__name__)


def compress_baseline(teacher: nn.Module, tokenizer, task: Task, cfg: CompressConfig,
                      data: TaskData, *, evaluate_models: bool = True, progress: bool = True,
                      checkpoint_dir=None, resume: bool = False, shared: dict | None = None
                      ) -> CompressResult:
    """Compress ``teacher`` with baseline ``cfg.method``; the teacher is left untouched.

    ``shared``: see ``pgb.pipeline.run_method`` (structured's mask Fisher is reused).
    """
    if cfg.method not in ("magnitude", "structured"):
        raise ValueError(f"compress_baseline runs methods 'magnitude' and 'structured', got "
                         f"{cfg.method!r}; use pgb.pipeline.compress for 'pgb'")
    teacher.eval()
    seconds: dict[str, float] = {"importance": 0.0, "grouping": 0.0, "compensation": 0.0}
    clock = _Clock(seconds)
    student = copy.deepcopy(teacher)
    student.config.pgb_task = task.name
    if cfg.method == "magnitude":
        masks, report = _magnitude(student, teacher, cfg, clock)
        held = masks_held(student, masks)
    else:
        cfg, report = _structured(student, teacher, cfg, data, clock, progress, shared)
        held = contextlib.nullcontext()
    with held:
        before = dev_metrics(student, task, tokenizer, data, progress) \
            if evaluate_models and cfg.refinetune else None
        with clock("refinetune"):
            info = refinetune(student, teacher, data, cfg, progress, checkpoint_dir, resume)
    round_embeddings(student, cfg.embedding_dtype)  # before evaluation: metrics as saved
    report = {
        "method": cfg.method, "target_sparsity": cfg.sparsity,
        "target_flops_ratio": cfg.flops_ratio, **report,
        "params_before": count_params(teacher), "params_after": count_params(student),
        "flops_ratio": flops_ratio(student, teacher), "stage_seconds": seconds,
        "refinetune": info, "config": cfg.to_dict(), "pgb_version": __version__,
        "task": task.name}
    if evaluate_models:
        add_metrics(report, teacher, student, task, tokenizer, data, progress, before)
    return CompressResult(student, report)


# ---------------------------------------------------------------- magnitude


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.<role>": weight}`` of every encoder linear matrix, in layer order."""
    return {f"{i}.{r}": get_matrix(model, i, r).weight
            for i in range(dims_of(model).layers) for r in MATRICES}


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing exactly ``round(sparsity * total)`` smallest |w|.

    One threshold over all encoder linear weights; ties at the threshold are broken by
    position (layer, role, row-major), so the count is exact. Example: weights
    ``{"0.query": [[3, 1]], "0.key": [[0.5, 2]]}`` at sparsity 0.5 keep 3 and 2.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = _weights(model)
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = round(sparsity * flat.numel())
    prune = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k).values
        prune = flat < threshold
        ties = torch.nonzero(flat == threshold).flatten()
        prune[ties[:k - int(prune.sum())]] = True
    keep = (~prune).split([w.numel() for w in weights.values()])
    return {n: m.view(w.shape) for (n, w), m in zip(weights.items(), keep, strict=True)}


class _Mask(nn.Module):
    """Weight parametrization ``w * mask``: masked weights stay zero whatever the optimizer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@contextlib.contextmanager
def masks_held(model: nn.Module, masks: dict[str, torch.Tensor]):
    """``with masks_held(model, masks):`` train with the masks enforced on every step.

    On exit the parametrizations are removed, leaving plain ``nn.Linear`` weights with
    exact zeros (the saved model loads with ``from_pretrained``).
    """
    linears = {n: get_matrix(model, int(n.split(".")[0]), n.split(".")[1]) for n in masks}
    for name, linear in linears.items():
        parametrize.register_parametrization(linear, "weight", _Mask(masks[name]))
    try:
        yield model
    finally:
        for linear in linears.values():
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def _magnitude(student, teacher, cfg: CompressConfig, clock) -> tuple[dict, dict]:
    """Mask ``student`` in place; returns the keep-masks and the report entries."""
    with clock("importance"):
        masks = magnitude_masks(student, cfg.sparsity)
    with torch.no_grad():
        for name, w in _weights(student).items():
            w.mul_(masks[name].to(w))
    total = sum(m.numel() for m in masks.values())
    removed = total - sum(int(m.sum()) for m in masks.values())
    teacher_w = _weights(teacher)
    matrices = [{"name": n, "groups": 1, "retained_importance": float(
        teacher_w[n].detach().abs()[masks[n]].sum() / teacher_w[n].detach().abs().sum()
        .clamp_min(1e-30))} for n in masks]
    d = dims_of(student)
    dropped = [f"{i}.{kind}" for i in range(d.layers) for kind, roles in SUBLAYERS.items()
               if not any(bool(masks[f"{i}.{r}"].any()) for r in roles)]
    return masks, {"achieved_sparsity": removed / total, "matrices": matrices,
            "groups": {f"{i}.{k}": 1 for i in range(d.layers) for k in SUBLAYERS},
            "dropped_sublayers": dropped, "compensation": "n/a"}


# ---------------------------------------------------------------- structured


def _structured(student, teacher, cfg: CompressConfig, data, clock, progress,
                shared: dict | None = None) -> tuple[CompressConfig, dict]:
    """Kwon et al. 2022 on ``student`` in place (see ``pgb.structured``); the config (its
    sparsity solved when the budget is a FLOPs ratio) and the report entries."""
    calib = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed)
    with clock("importance"):  # the student is still the teacher's copy here
        head_fisher, neuron_fisher = shared_stage(shared, "mask_fisher",
                                                  lambda: mask_fisher(student, calib, progress))

    def plan_at(sparsity: float) -> Structure:
        return select(head_fisher, neuron_fisher, dims_of(student), sparsity,
                      student.config.model_type)

    with clock(budget_stage(cfg)):
        cfg, budget = budget_sparsity(
            cfg, plan_at, lambda structure: shrink(copy.deepcopy(student), structure), student)
    with clock("grouping"):
        structure = plan_at(cfg.sparsity)
    shrink(student, structure)
    with clock("compensation"):
        if cfg.compensate:
            rescale(student, teacher, calib, cfg.damping, progress)
    d = structure.dims
    return cfg, {**budget, "achieved_sparsity": structure.sparsity(),
            "matrices": _retained(structure, head_fisher, neuron_fisher),
            "groups": {f"{i}.{k}": 1 for i in range(d.layers) for k in SUBLAYERS},
            "dropped_sublayers": structure.dropped_sublayers(),
            "compensation": "least-squares rescaling" if cfg.compensate else "off",
            "kept_heads": [len(h) for h in structure.heads],
            "kept_neurons": [len(n) for n in structure.neurons]}


def _retained(structure: Structure, head_fisher, neuron_fisher) -> list[dict]:
    """Per matrix: the fraction of its sublayer's mask Fisher that the kept units hold."""
    rows = []
    for i in range(structure.dims.layers):
        for kind, kept, fisher in (("attn", structure.heads[i], head_fisher[i]),
                                   ("ffn", structure.neurons[i], neuron_fisher[i])):
            share = float(fisher[list(kept)].sum() / fisher.sum().clamp_min(1e-30))
            rows += [{"name": f"{i}.{r}", "groups": 1, "retained_importance": share}
                     for r in SUBLAYERS[kind]]
    return rows
