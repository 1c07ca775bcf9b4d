"""Model surgery: turn a (masked) dense model into its compact grouped form, and back.

``to_compact`` replaces every pruned matrix by a ``GroupedLinear`` holding only its kept
blocks. The sublayer's inner permutation is folded into the weights: query/key/value and
ffn_in emit their outputs in the inner order, attn_out and ffn_out read them in that
order, so no gather is paid on the inner dimension (attention scores and contexts are
unchanged because heads stay contiguous and Q, K, V, O share the order). Only the hidden
side gathers (query/key/value/ffn_in inputs) or scatters (attn_out/ffn_out outputs).
Dropped sublayers cost nothing: the attention core is replaced by ``DroppedAttention``
and the branch output by its bias (``ConstantOutput``).

Shared order (recipes made with ``shared_order``, ``recipe.meta["shared_order"]``): the
matrices of a sublayer share one hidden-side permutation, so the residual stream itself is
kept in that order through the sublayer (``stream_orders``). The hidden side of its
matrices is then folded into the weights too, and the only gathers left are one per change
of order, done by the LayerNorm that closes the previous sublayer (``OrderedLayerNorm``,
a LayerNorm is equivariant under permutation): at most 2 per layer plus one back to the
original order after the last layer, instead of 6 per layer. Hidden states between layers
(``output_hidden_states``) are then in the compact model's internal order
(``hidden_state_orders``); the encoder output and the logits are not.

``densify`` rebuilds the masked dense twin (plain ``nn.Linear`` everywhere, original index
order): the reference the compact model must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import INNER_IS_ROWS, SUBLAYERS, encoder, get_arch, get_matrix, set_module
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


class OrderedLayerNorm(nn.Module):
    """A LayerNorm on a residual stream held in permuted order, handing its output on in
    the next sublayer's order.

    ``order``: the stream arrives as ``x[..., j] = x_original[..., order[j]]`` (None: the
    original order); the affine parameters are stored in that order. ``gather``: the output
    is ``y[..., gather]`` (None: no gather). Same parameter names as ``nn.LayerNorm``.
    """

    def __init__(self, norm: nn.LayerNorm, order: torch.Tensor | None,
                 gather: torch.Tensor | None):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight, self.bias = (
            None if t is None else nn.Parameter(_in_order(t.detach(), order).clone())
            for t in (norm.weight, norm.bias))
        device = next(norm.parameters(), torch.empty(0)).device
        for name, idx in (("order", order), ("gather", gather)):
            self.register_buffer(name, None if idx is None else idx.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.gather is None:
            return y
        return y.reshape(-1, y.shape[-1]).index_select(1, self.gather).view(y.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, permuted={self.order is not None}, "
                f"gather={self.gather is not None}")


Key = tuple[int, str]


def _units(recipe: Recipe) -> list[Key]:
    """The sublayers in the order the residual stream passes them."""
    return [(layer, kind) for layer in range(recipe.dims.layers) for kind in SUBLAYERS]


def stream_orders(recipe: Recipe) -> dict[Key, torch.Tensor | None]:
    """The residual stream's order inside each sublayer (None: the original order).

    Only ``shared_order`` recipes reorder the stream: a sublayer with G > 1 runs in its
    shared outer permutation; a dense (G = 1) or dropped one keeps the order it receives,
    since any order suits it.
    """
    plans = {(p.layer, p.kind): p for p in recipe.sublayers}
    orders: dict[Key, torch.Tensor | None] = {}
    current = None
    for key in _units(recipe):
        plan = plans[key]
        if recipe.meta.get("shared_order") and plan.groups > 1 and not plan.dropped:
            perm = torch.tensor(next(iter(plan.matrices.values())).outer_perm)
            current = None if is_identity(perm) else perm
        orders[key] = current
    return orders


def hidden_state_orders(model: nn.Module) -> list[torch.Tensor | None]:
    """Order of each of ``output_hidden_states`` (embeddings, then every layer) of a
    compact model: ``hidden[..., j]`` is the original model's ``hidden[..., order[j]]``.
    None everywhere for models that keep the original order."""
    recipe: Recipe = model.pgb_recipe
    orders = stream_orders(recipe)
    n = recipe.dims.layers
    return [orders[(layer, "attn")] for layer in range(n)] + [None]


def _transition(src: torch.Tensor | None, dst: torch.Tensor | None) -> torch.Tensor | None:
    """Index that turns a stream in order ``src`` into order ``dst`` (None: no change)."""
    if src is None and dst is None:
        return None
    n = len(src if src is not None else dst)
    pos = torch.arange(n) if src is None else torch.argsort(src)
    idx = pos if dst is None else pos[dst]
    return None if is_identity(idx) else idx


def _reorder_stream(model: nn.Module, recipe: Recipe,
                    orders: dict[Key, torch.Tensor | None]) -> None:
    """Swap the sublayers' closing LayerNorms (and the embeddings' exit) for ordered ones."""
    spec, enc = get_arch(model), encoder(model)
    units = _units(recipe)
    first = orders[units[0]]
    project = getattr(enc, "embeddings_project", None)
    if project is not None:  # ELECTRA: the stream starts at this linear's output
        if first is not None:
            project.weight.copy_(_in_order(project.weight, first))
            project.bias.copy_(_in_order(project.bias, first))
    else:
        norm = enc.get_submodule(spec.embed_norm)
        set_module(enc, spec.embed_norm, OrderedLayerNorm(norm, None, first))
    for i, (layer, kind) in enumerate(units):
        nxt = orders[units[i + 1]] if i + 1 < len(units) else None
        path = f"{spec.layers}.{layer}.{spec.attn_norm if kind == 'attn' else spec.ffn_norm}"
        norm = enc.get_submodule(path)
        set_module(enc, path, OrderedLayerNorm(norm, orders[(layer, kind)],
                                               _transition(orders[(layer, kind)], nxt)))


def is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm.cpu(), torch.arange(len(perm))))


def _grouped(linear: nn.Linear, plan: SublayerPlan, role: str, shared: bool = False,
             order: torch.Tensor | None = None) -> nn.Module:
    """The compact form of one matrix. ``shared``: a shared-order recipe, whose stream runs
    in ``order`` here (None: original order); the hidden side is folded into the weight
    (no gather, no scatter)."""
    rows, cols = plan.bands(role)
    kept = plan.matrices[role].kept
    inner_rows = INNER_IS_ROWS[role]
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(len(rows))
    if shared:
        # the hidden side in stream coordinates: W[:, order] for readers, W[order] for
        # writers; one block (G = 1) covers every hidden index, in any order
        hidden = cols if inner_rows else rows
        if plan.groups == 1:
            hidden = torch.arange(len(hidden))
        elif order is not None:
            hidden = torch.argsort(order)[hidden]
        if inner_rows:
            weight = _in_order(weight.T, order).T
        else:
            weight, bias = _in_order(weight, order), _in_order(bias, order)
        rows, cols = (rows, hidden) if inner_rows else (hidden, cols)
    if plan.groups == 1 and kept and is_identity(rows) and is_identity(cols):
        # dense and unpermuted: the fastest kernel is nn.Linear itself
        if order is not None:  # its weights in stream order
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(bias)
        return linear
    return GroupedLinear.from_dense(
        weight, bias, plan.groups, list(kept), rows, cols,
        gather_input=inner_rows and not is_identity(cols),
        scatter_output=not inner_rows and not is_identity(rows))


def _drop(model: nn.Module, plan: SublayerPlan, order: torch.Tensor | None = None) -> None:
    spec, enc = get_arch(model), encoder(model)
    layer = f"{spec.layers}.{plan.layer}"
    if plan.kind == "ffn":
        out = get_matrix(model, plan.layer, "ffn_out")
        set_module(enc, f"{layer}.{spec.ffn_in}", EmptyOutput())
        set_module(enc, f"{layer}.{spec.ffn_out}", ConstantOutput(
            out.out_features, _in_order(out.bias.detach(), order)))
        return
    out = get_matrix(model, plan.layer, "attn_out")
    const = ConstantOutput(out.bias.shape[0], _in_order(out.bias.detach(), order))
    if spec.attn_out_in_core:
        set_module(enc, f"{layer}.{spec.attn_core}", DroppedAttention(const))
    else:
        set_module(enc, f"{layer}.{spec.attn_core}", DroppedAttention())
        set_module(enc, f"{layer}.{spec.attn_out}", const)


def count_gathers(model: nn.Module) -> int:
    """Column gathers and scatters one forward of a compact model pays: index maps of its
    grouped layers and order changes of its residual stream."""
    n = 0
    for module in model.modules():
        if isinstance(module, GroupedLinear):
            n += (module.in_index is not None) + (module.out_index is not None)
        elif isinstance(module, OrderedLayerNorm):
            n += module.gather is not None
    return n


def _in_order(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return t if order is None else t[order.to(t.device)]


def to_compact(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Replace the pruned matrices of ``model`` (in place) by their compact forms.

    The model's weights outside kept blocks are ignored, so a masked dense model and its
    unmasked original give the same compact model. Returns ``model``.
    """
    spec = get_arch(model)
    shared = bool(recipe.meta.get("shared_order"))
    orders = stream_orders(recipe)
    with torch.no_grad():
        for plan in recipe.sublayers:
            order = orders[(plan.layer, plan.kind)]
            if plan.dropped:
                _drop(model, plan, order)
                continue
            for role in plan.matrices:
                path = spec.matrix_path(plan.layer, role)
                set_module(encoder(model), path, _grouped(get_matrix(model, plan.layer, role),
                                                          plan, role, shared, order))
        if shared:
            _reorder_stream(model, recipe, orders)
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
        orders = stream_orders(recipe)
        for plan in recipe.sublayers:
            order = orders[(plan.layer, plan.kind)]
            for role in plan.matrices:
                weight, bias = _dense_of(model, plan, role)
                if order is not None:  # the hidden side back to the original order
                    weight, bias = _unorder(weight, bias, role, order)
                target = get_matrix(dense, plan.layer, role)
                target.weight.copy_(weight)
                target.bias.copy_(bias)
        for name, module in model.named_modules():
            if isinstance(module, OrderedLayerNorm):
                norm = dense.get_submodule(name)
                for attr in ("weight", "bias"):
                    if getattr(module, attr) is not None:
                        getattr(norm, attr).copy_(_unorder_vector(getattr(module, attr),
                                                                  module.order))
        first = orders[_units(recipe)[0]]
        project = getattr(encoder(model), "embeddings_project", None)
        if project is not None and first is not None:
            target = encoder(dense).embeddings_project
            target.weight.copy_(_unorder_vector(project.weight, first))
            target.bias.copy_(_unorder_vector(project.bias, first))
    return dense


def _unorder_vector(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Undo ``t[order]`` along dim 0."""
    if order is None:
        return t.detach().clone()
    out = torch.empty_like(t)
    out[order.to(t.device)] = t.detach()
    return out


def _unorder(weight: torch.Tensor, bias: torch.Tensor, role: str,
             order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix's (weight, bias) with its hidden side from stream order back to original."""
    if INNER_IS_ROWS[role]:  # reads the stream: columns
        return _unorder_vector(weight.T, order).T, bias
    return _unorder_vector(weight, order), _unorder_vector(bias, order)


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
