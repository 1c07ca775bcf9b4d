"""Analytic cost of a model: parameter count and encoder FLOPs at a sequence length.

FLOPs count multiply-adds twice (2 * MACs) for the encoder's matrices (dense, grouped or
removed) and the attention products (Q K^T and P V); embeddings, LayerNorm, softmax,
activations and the task head are left out, as they are the same for every method.
"""

from __future__ import annotations

from torch import nn

from .arch import dims_of, get_arch, layer_module
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
