"""Model surgery: turn a (masked) dense model into its compact grouped form, and back.

``to_compact`` replaces every pruned matrix by a ``GroupedLinear`` holding only its kept
blocks. The sublayer's inner permutation is folded into the weights: query/key/value and
ffn_in emit their outputs in the inner order, attn_out and ffn_out read them in that
order, so no gather is paid on the inner dimension (attention scores and contexts are
unchanged because heads stay contiguous and Q, K, V, O share the order). Only the hidden
side gathers (query/key/value/ffn_in inputs) or scatters (attn_out/ffn_out outputs).
Dropped sublayers cost nothing: the attention core is replaced by ``DroppedAttention``
and the branch output by its bias (``ConstantOutput``).

``densify`` rebuilds the masked dense twin (plain ``nn.Linear`` everywhere, original index
order): the reference the compact model must match.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import INNER_IS_ROWS, encoder, get_arch, get_matrix, set_module
from .grouped_linear import GroupedLinear
from .recipe import Recipe, SublayerPlan


class ConstantOutput(nn.Module):
    """A branch reduced to its bias: returns ``bias`` broadcast to (..., out_features)."""

    def __init__(self, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features) if bias is None else bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., any) -> (..., out)
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


class EmptyOutput(nn.Module):
    """The first matrix of a dropped sublayer: emits a zero-width tensor, (..., 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class DroppedAttention(nn.Module):
    """Stands in for an attention core whose sublayer was dropped.

    Returns ``(output, None)`` like the cores it replaces. When the core also holds the
    output matrix (DistilBERT, MPNet) the output is that matrix's bias; otherwise it is a
    zero-width tensor consumed by the ``ConstantOutput`` that replaced the output matrix.
    """

    def __init__(self, out: ConstantOutput | None = None):
        super().__init__()
        self.out = out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.out is None:
            return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None
        return self.out(hidden_states), None


def _is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(len(perm))))


def _grouped(linear: nn.Linear, plan: SublayerPlan, role: str) -> nn.Module:
    rows, cols = plan.bands(role)
    kept = plan.matrices[role].kept
    if plan.groups == 1 and kept and _is_identity(rows) and _is_identity(cols):
        return linear  # dense and unpermuted: the fastest kernel is nn.Linear itself
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    inner_rows = INNER_IS_ROWS[role]
    return GroupedLinear.from_dense(
        linear.weight.detach(), bias.detach(), plan.groups, list(kept), rows, cols,
        gather_input=inner_rows and not _is_identity(cols),
        scatter_output=not inner_rows and not _is_identity(rows))


def _drop(model: nn.Module, plan: SublayerPlan) -> None:
    spec, enc = get_arch(model), encoder(model)
    layer = f"{spec.layers}.{plan.layer}"
    if plan.kind == "ffn":
        out = get_matrix(model, plan.layer, "ffn_out")
        set_module(enc, f"{layer}.{spec.ffn_in}", EmptyOutput())
        set_module(enc, f"{layer}.{spec.ffn_out}", ConstantOutput(out.out_features,
                                                                  out.bias.detach()))
        return
    out = get_matrix(model, plan.layer, "attn_out")
    const = ConstantOutput(out.bias.shape[0], out.bias.detach())
    if spec.attn_out_in_core:
        set_module(enc, f"{layer}.{spec.attn_core}", DroppedAttention(const))
    else:
        set_module(enc, f"{layer}.{spec.attn_core}", DroppedAttention())
        set_module(enc, f"{layer}.{spec.attn_out}", const)


def to_compact(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Replace the pruned matrices of ``model`` (in place) by their compact forms.

    The model's weights outside kept blocks are ignored, so a masked dense model and its
    unmasked original give the same compact model. Returns ``model``.
    """
    spec = get_arch(model)
    with torch.no_grad():
        for plan in recipe.sublayers:
            if plan.dropped:
                _drop(model, plan)
                continue
            for role in plan.matrices:
                path = spec.matrix_path(plan.layer, role)
                set_module(encoder(model), path, _grouped(get_matrix(model, plan.layer, role),
                                                          plan, role))
    model.pgb_recipe = recipe
    return model


def densify(model: nn.Module) -> nn.Module:
    """The masked dense twin of a compact model: plain ``nn.Linear`` layers, original order.

    Built fresh from the model's config; every non-pruned tensor (embeddings, LayerNorms,
    task head) is copied, every pruned matrix is expanded from its kept blocks.
    """
    recipe: Recipe | None = getattr(model, "pgb_recipe", None)
    if recipe is None:
        raise ValueError("densify needs a compact pgb model (from pgb.compress or pgb.load); "
                         "this model carries no pgb recipe")
    dense = type(model)(model.config).to(next(model.parameters()).device)
    dense.train(model.training)
    source = model.state_dict()
    with torch.no_grad():
        for name, tensor in dense.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
        for plan in recipe.sublayers:
            for role in plan.matrices:
                weight, bias = _dense_of(model, plan, role)
                target = get_matrix(dense, plan.layer, role)
                target.weight.copy_(weight)
                target.bias.copy_(bias)
    return dense


def _dense_of(model: nn.Module, plan: SublayerPlan, role: str) -> tuple[torch.Tensor, ...]:
    """(weight, bias) in original order of whatever stands at matrix ``role`` of ``model``."""
    spec, d = get_arch(model), plan_dims(model, plan)
    out_f, in_f = (d[0], d[1]) if INNER_IS_ROWS[role] else (d[1], d[0])
    zeros_w, zeros_b = torch.zeros(out_f, in_f), torch.zeros(out_f)
    layer = f"{spec.layers}.{plan.layer}"
    core = encoder(model).get_submodule(f"{layer}.{spec.attn_core}")
    if isinstance(core, DroppedAttention) and plan.kind == "attn":
        if role == "attn_out":
            const = core.out if core.out is not None else get_matrix(model, plan.layer, role)
            return zeros_w, const.bias.detach().clone()
        return zeros_w, zeros_b
    module = get_matrix(model, plan.layer, role)
    if isinstance(module, ConstantOutput):
        return zeros_w, module.bias.detach().clone()
    if isinstance(module, EmptyOutput):
        return zeros_w, zeros_b
    if isinstance(module, nn.Linear):
        return module.weight.detach().clone(), module.bias.detach().clone()
    w, b = module.to_dense()
    inner = torch.tensor(plan.inner_perm)
    out_w, out_b = torch.zeros_like(w), b.detach().clone()
    if INNER_IS_ROWS[role]:  # rows (and biases) come out in inner order
        out_w[inner] = w.detach()
        out_b[inner] = b.detach()
    else:  # columns are read in inner order
        out_w[:, inner] = w.detach()
    return out_w, out_b


def plan_dims(model: nn.Module, plan: SublayerPlan) -> tuple[int, int]:
    """(inner size, hidden size) of a sublayer."""
    d = model.pgb_recipe.dims
    return (d.hidden if plan.kind == "attn" else d.intermediate), d.hidden
