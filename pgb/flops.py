"""Analytic cost of a model: parameter count and encoder FLOPs at a sequence length.

FLOPs count multiply-adds twice (2 * MACs) for the encoder's matrices (dense, grouped or
removed) and the attention products (Q K^T and P V); embeddings, LayerNorm, softmax,
activations and the task head are left out, as they are the same for every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from .arch import Dims, dims_of, encoder_linear_params, get_arch, layer_module
from .grouped_linear import GroupedLinear
from .surgery import DroppedAttention


def count_params(model: nn.Module) -> int:
    """Number of stored parameters (index buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _matrix_flops(module: nn.Module, tokens: int) -> int:
    if isinstance(module, GroupedLinear):
        g = module.groups
        return 2 * tokens * len(module.kept) * (module.in_features // g) * \
            (module.out_features // g)
    if isinstance(module, nn.Linear):
        return 2 * tokens * module.in_features * module.out_features
    return 0


def flops(model: nn.Module, seq_len: int) -> int:
    """Encoder forward FLOPs of one sequence of ``seq_len`` tokens."""
    spec = get_arch(model)
    total = 0
    for i in range(dims_of(model).layers):
        layer = layer_module(model, i)
        for module in layer.modules():
            total += _matrix_flops(module, seq_len)
        core = layer.get_submodule(spec.attn_core)
        if not isinstance(core, DroppedAttention):
            width = layer.get_submodule(spec.query).out_features
            total += 2 * 2 * seq_len * seq_len * width  # scores and context
    return total


REPORT_SEQ_LEN = 128  # the sequence length of report.json's flops_ratio and --flops-ratio


def counted_flops(seq_len: int, kept_weights: int, attention_widths: Sequence[int]) -> int:
    """``flops`` from counts: encoder linear weights kept, and per layer the width of its
    attention products (hidden size, fewer with heads removed, 0 when the sublayer is gone)."""
    return 2 * seq_len * kept_weights + sum(4 * seq_len * seq_len * w for w in attention_widths)


def dense_flops(dims: Dims, seq_len: int) -> int:
    """``flops`` of the uncompressed encoder."""
    total = dims.layers * sum(encoder_linear_params(dims).values())
    return counted_flops(seq_len, total, [dims.hidden] * dims.layers)


class OutOfReach(ValueError):
    """No sparsity up to the highest tried meets the budget; ``least`` is the cost there."""

    def __init__(self, least: float):
        super().__init__(f"out of reach: the least cost is {least}")
        self.least = least


def smallest_sparsity(cost_at: Callable[[float], float], target: float,
                      tolerance: float = 1e-4, highest: float = 0.995,
                      try_zero: bool = True) -> float:
    """Smallest sparsity whose plan costs at most ``target``.

    ``cost_at(s)`` plans at sparsity ``s`` and returns its cost (it falls as ``s`` grows;
    ``inf`` where no plan can be made); bisection to within ``tolerance``. The returned
    sparsity's plan meets the target. ``try_zero=False`` skips the check of sparsity 0
    (for a budget the teacher never meets). OutOfReach when even ``highest`` does not.
    """
    if try_zero and cost_at(0.0) <= target:
        return 0.0
    least = cost_at(highest)
    if least > target:
        raise OutOfReach(least)
    lo, hi = 0.0, highest
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if cost_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def sparsity_for_flops(ratio_at: Callable[[float], float], target: float,
                       tolerance: float = 1e-4, highest: float = 0.995) -> float:
    """Smallest sparsity whose plan has a FLOPs ratio of at most ``target``.

    ``ratio_at(s)`` plans at sparsity ``s`` and returns its FLOPs ratio (see
    ``smallest_sparsity``). ValueError when even ``highest`` does not reach it, naming the
    least ratio.
    """
    try:
        return smallest_sparsity(ratio_at, target, tolerance, highest)
    except OutOfReach as err:
        reach = math.ceil(err.least * 1000) / 1000  # rounded up: a reachable ratio
        raise ValueError(f"FLOPs ratio {target} is out of reach: even sparsity {highest} "
                         f"leaves {err.least:.4f} (the attention products of the kept "
                         f"attention sublayers remain); ask for {reach:g} or more") from None


def flops_ratio(model: nn.Module, reference: nn.Module, seq_len: int = REPORT_SEQ_LEN) -> float:
    """``flops(model) / flops(reference)``: report.json's ``flops_ratio``."""
    return flops(model, seq_len) / flops(reference, seq_len)


def plan_flops_ratio(plan, seq_len: int = REPORT_SEQ_LEN) -> float:
    """FLOPs ratio of a Recipe or Structure (anything with ``dims`` and ``flops_counts``)."""
    return counted_flops(seq_len, *plan.flops_counts()) / dense_flops(plan.dims, seq_len)
