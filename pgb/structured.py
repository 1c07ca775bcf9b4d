"""Structured baseline: head and FFN-neuron pruning after Kwon et al. 2022.

"A Fast Post-Training Pruning Framework for Transformers" in four stages, each a call:

1. ``mask_fisher``: a mask variable m (all ones) multiplies every head's context output
   (the ``attn_out`` input) and every FFN neuron (the ``ffn_out`` input); its importance is
   the empirical Fisher sum over calibration batches of (dL/dm)^2. The masks are forward
   pre-hooks, so every family of the architecture table works on current transformers.
2. ``select``: keep the most important heads and neurons under a budget of encoder linear
   weights (a head costs 4 * hidden * head_size, a neuron 2 * hidden). Under the diagonal
   Fisher approximation, removing a set loses the sum of its Fisher values; as all heads
   cost the same and so do all neurons, trying every head count k (top-k heads, then the
   top neurons that fit) is an exact solution of that knapsack (Kwon's mask search).
3. ``shrink``: physically remove the pruned heads and neurons (smaller ``nn.Linear``s,
   core head counts updated); a layer with no head or no neuron left loses the sublayer
   exactly as PGB drops one (``DroppedAttention`` / ``ConstantOutput``).
4. ``rescale`` (Kwon's mask tuning): layer by layer, per-head and per-neuron scales that
   best reconstruct the teacher's sublayer output (plus residual) by linear least squares,
   folded into the ``attn_out`` / ``ffn_out`` columns. Where Kwon solve with LSMR and stop
   at scales beyond +-10, a ridge towards 1 (no rescaling) keeps ill-posed layers tame.

Kwon's mask rearrangement (block-diagonal Fisher within a layer) and the CLS-only target of
the last FFN are left out. Saved folders hold ``structure.json`` (kept heads and neurons);
``pgb.load`` rebuilds the shrunk model from it.

Example::

    >>> heads, neurons = mask_fisher(student, calib)          # (L, H), (L, I)
    >>> structure = select(heads, neurons, dims_of(student), 0.5, "bert")
    >>> shrink(student, structure); rescale(student, teacher, calib)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from . import __version__
from .arch import Dims, dims_of, encoder, get_arch, get_matrix, layer_module, set_module
from .checkpoint import WEIGHTS, weights_state
from .compensate import _advance, _call, _hidden, _layer0_inputs, _Stop
from .surgery import DroppedAttention, _drop

STRUCTURE = "structure.json"
FORMAT = "pgb-structured"
STRUCTURE_VERSION = 1


@dataclass(frozen=True)
class Structure:
    """Kept attention heads and FFN neurons of every layer (original indices, ascending).

    Example: ``Structure("bert", Dims(2, 24, 4, 60), heads=((0, 2), ()), neurons=...)``
    keeps heads 0 and 2 of layer 0 and drops the attention sublayer of layer 1.
    """

    model_type: str
    dims: Dims
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]

    def kept_weights(self) -> int:
        """Encoder linear weights kept (biases excluded)."""
        d = self.dims
        return sum(4 * d.hidden * d.head_size * len(h) + 2 * d.hidden * len(n)
                   for h, n in zip(self.heads, self.neurons, strict=True))

    def sparsity(self) -> float:
        """Fraction of encoder linear weights removed."""
        d = self.dims
        return 1.0 - self.kept_weights() / (d.layers * (4 * d.hidden ** 2
                                                         + 2 * d.hidden * d.intermediate))

    def flops_counts(self) -> tuple[int, list[int]]:
        """(encoder linear weights kept, attention-product width per layer), as
        ``Recipe.flops_counts``: the kept heads times the head size."""
        return self.kept_weights(), [len(h) * self.dims.head_size for h in self.heads]

    def dropped_sublayers(self) -> list[str]:
        out = [f"{i}.attn" for i, h in enumerate(self.heads) if not h]
        return out + [f"{i}.ffn" for i, n in enumerate(self.neurons) if not n]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": STRUCTURE_VERSION, "model_type": self.model_type,
                "dims": asdict(self.dims), "heads": [list(h) for h in self.heads],
                "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_json(cls, data: dict) -> Structure:
        if data.get("version") != STRUCTURE_VERSION:
            raise ValueError(f"unsupported structure version {data.get('version')!r}; this "
                             f"pgb reads version {STRUCTURE_VERSION}")
        s = cls(data["model_type"], Dims(**data["dims"]),
                tuple(tuple(h) for h in data["heads"]), tuple(tuple(n) for n in data["neurons"]))
        s.validate()
        return s

    def validate(self) -> None:
        d = self.dims
        if len(self.heads) != d.layers or len(self.neurons) != d.layers:
            raise ValueError(f"structure lists {len(self.heads)} head and {len(self.neurons)} "
                             f"neuron sets; the model has {d.layers} layers")
        for what, sets, n in (("heads", self.heads, d.heads),
                              ("neurons", self.neurons, d.intermediate)):
            for i, kept in enumerate(sets):
                if list(kept) != sorted(set(kept)) or any(not 0 <= k < n for k in kept):
                    raise ValueError(f"layer {i} {what} {list(kept)[:8]}... must be sorted "
                                     f"distinct indices in [0, {n})")


# ---------------------------------------------------------------- 1. importance (Fisher)


def _head_hook(mask: torch.Tensor):
    """Pre-hook on ``attn_out``: input (B, T, heads * hs) times mask (heads,) per head."""
    def hook(_module, args):
        x = args[0]
        x = (x.unflatten(-1, (mask.shape[0], -1)) * mask.to(x.dtype).unsqueeze(-1)).flatten(-2)
        return (x, *args[1:])
    return hook


def _neuron_hook(mask: torch.Tensor):
    """Pre-hook on ``ffn_out``: input (B, T, intermediate) times mask (intermediate,)."""
    def hook(_module, args):
        return (args[0] * mask.to(args[0].dtype), *args[1:])
    return hook


def mask_fisher(model: nn.Module, batches: list[dict], progress: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher of head and neuron masks, float64 on the CPU: (layers, heads), (layers, inter).

    Per calibration batch the task loss is differentiated w.r.t. all-ones masks (model
    weights frozen, dropout off) and the squared gradients are summed.
    """
    d, device = dims_of(model), next(model.parameters()).device
    heads = torch.ones(d.layers, d.heads, device=device, requires_grad=True)
    neurons = torch.ones(d.layers, d.intermediate, device=device, requires_grad=True)
    handles = []
    for i in range(d.layers):
        handles.append(get_matrix(model, i, "attn_out").register_forward_pre_hook(
            _head_hook(heads[i])))
        handles.append(get_matrix(model, i, "ffn_out").register_forward_pre_hook(
            _neuron_hook(neurons[i])))
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = [torch.zeros(heads.shape, dtype=torch.float64),
            torch.zeros(neurons.shape, dtype=torch.float64)]
    try:
        model.eval().requires_grad_(False)
        for batch in tqdm(batches, desc="importance (mask fisher)", disable=not progress):
            loss = model(**{k: v.to(device) if torch.is_tensor(v) else v
                            for k, v in batch.items()}).loss
            for acc, g in zip(sums, torch.autograd.grad(loss, [heads, neurons]), strict=True):
                acc += g.detach().double().pow(2).cpu()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return sums[0], sums[1]


# ---------------------------------------------------------------- 2. selection


def select(head_fisher: torch.Tensor, neuron_fisher: torch.Tensor, dims: Dims, sparsity: float,
           model_type: str) -> Structure:
    """Heads and neurons to keep: most retained Fisher with at most (1 - sparsity) weights.

    For every head count k, the top-k heads and then as many top neurons as the remaining
    budget allows; the k with the largest retained Fisher wins (exact for two item classes
    of uniform cost). The budget is left unused by less than one neuron unless every
    neuron is kept, so the achieved sparsity is the target plus at most 2 * hidden weights.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    d = dims
    head_cost, neuron_cost = 4 * d.hidden * d.head_size, 2 * d.hidden
    budget = int((1.0 - sparsity) * d.layers * (4 * d.hidden ** 2 + 2 * d.hidden * d.intermediate)
                 + 1e-6)
    h_order = _descending(head_fisher.flatten())
    n_order = _descending(neuron_fisher.flatten())
    h_gain = torch.cat([torch.zeros(1, dtype=torch.float64),
                        head_fisher.flatten().double()[h_order].cumsum(0)])
    n_gain = torch.cat([torch.zeros(1, dtype=torch.float64),
                        neuron_fisher.flatten().double()[n_order].cumsum(0)])
    best = (-1.0, 0, 0)
    for k in range(min(len(h_order), budget // head_cost) + 1):
        m = min(len(n_order), (budget - k * head_cost) // neuron_cost)
        best = max(best, (float(h_gain[k] + n_gain[m]), k, m))  # ties: more heads kept
    _, k, m = best
    heads = _per_layer(h_order[:k], d.layers, d.heads)
    neurons = _per_layer(n_order[:m], d.layers, d.intermediate)
    return Structure(model_type, d, heads, neurons)


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score; ties broken by index, so the order is reproducible."""
    return torch.sort(-scores.double(), stable=True).indices


def _per_layer(flat_kept: torch.Tensor, layers: int, per: int) -> tuple[tuple[int, ...], ...]:
    kept = sorted(flat_kept.tolist())
    return tuple(tuple(i - layer * per for i in kept if layer * per <= i < (layer + 1) * per)
                 for layer in range(layers))


def head_columns(heads: tuple[int, ...], head_size: int) -> torch.Tensor:
    """Inner indices (heads x head size) of the given heads: (len(heads) * head_size,)."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_size
            + torch.arange(head_size)).flatten()


def mask_units(model: nn.Module, structure: Structure) -> None:
    """Zero the ``attn_out`` / ``ffn_out`` columns of pruned units (masked dense reference)."""
    d = structure.dims
    with torch.no_grad():
        for i in range(d.layers):
            for role, kept, n, width in (("attn_out", structure.heads[i], d.heads, d.head_size),
                                         ("ffn_out", structure.neurons[i], d.intermediate, 1)):
                pruned = sorted(set(range(n)) - set(kept))
                if pruned:
                    w = get_matrix(model, i, role).weight
                    w[:, head_columns(tuple(pruned), width).to(w.device)] = 0


# ---------------------------------------------------------------- 3. physical removal


def _rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[idx.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[idx.to(linear.bias.device)])
    return new


def _cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[:, idx.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


class _KeptHeadBias:
    """Pre-hook slicing a per-head ``position_bias`` (B, heads, T, T) to the kept heads.

    MPNet computes its relative position bias once, outside the layers, for all heads.
    """

    def __init__(self, kept: tuple[int, ...]):
        self.kept = torch.tensor(kept, dtype=torch.long)

    def __call__(self, _module, args, kwargs):
        if len(args) > 2 and args[2] is not None:
            args = (*args[:2], args[2].index_select(1, self.kept.to(args[2].device)), *args[3:])
        elif kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"]
            kwargs = {**kwargs, "position_bias": bias.index_select(1, self.kept.to(bias.device))}
        return args, kwargs


def _shrink_attn(model: nn.Module, layer: int, kept: tuple[int, ...], d: Dims) -> None:
    spec, enc = get_arch(model), encoder(model)
    if len(kept) == d.heads:
        return
    if not kept:  # _drop reads only .layer and .kind of its plan
        _drop(model, SimpleNamespace(layer=layer, kind="attn"))
        return
    idx = head_columns(kept, d.head_size)
    for role in ("query", "key", "value"):
        set_module(enc, spec.matrix_path(layer, role), _rows(get_matrix(model, layer, role), idx))
    set_module(enc, spec.matrix_path(layer, "attn_out"),
               _cols(get_matrix(model, layer, "attn_out"), idx))
    # cores reshape with -1 heads; those that store a head count or width need them updated
    core = layer_module(model, layer).get_submodule(spec.attn_core)
    for attr in spec.core_head_attrs:
        setattr(core, attr, len(kept))
    for attr in spec.core_width_attrs:
        setattr(core, attr, len(kept) * d.head_size)
    if spec.fixed_head_order:  # per-head tensors from outside the layer (MPNet)
        core.register_forward_pre_hook(_KeptHeadBias(kept), with_kwargs=True)


def _shrink_ffn(model: nn.Module, layer: int, kept: tuple[int, ...], d: Dims) -> None:
    spec, enc = get_arch(model), encoder(model)
    if len(kept) == d.intermediate:
        return
    if not kept:
        _drop(model, SimpleNamespace(layer=layer, kind="ffn"))
        return
    idx = torch.tensor(kept, dtype=torch.long)
    set_module(enc, spec.matrix_path(layer, "ffn_in"), _rows(get_matrix(model, layer, "ffn_in"),
                                                             idx))
    set_module(enc, spec.matrix_path(layer, "ffn_out"),
               _cols(get_matrix(model, layer, "ffn_out"), idx))


def shrink(model: nn.Module, structure: Structure) -> nn.Module:
    """Remove the pruned heads and neurons of ``model`` in place; returns it.

    The model gets attribute ``pgb_structure`` (what ``save_structured`` writes).
    """
    d = dims_of(model)
    if d != structure.dims or model.config.model_type != structure.model_type:
        raise ValueError(f"structure is for {structure.model_type} {structure.dims}, the model "
                         f"is {model.config.model_type} {d}")
    with torch.no_grad():
        for layer in range(d.layers):
            _shrink_attn(model, layer, structure.heads[layer], d)
            _shrink_ffn(model, layer, structure.neurons[layer], d)
    model.pgb_structure = structure
    return model


# ---------------------------------------------------------------- 4. least-squares rescaling


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (valid tokens, D); float32 (float64 for a float64 model), as compensate."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1)].to(dtype)


def _teacher_targets(teacher: nn.Module, layer: int, inp: dict) -> tuple[list, dict]:
    """Teacher sublayer outputs plus residuals, (tokens, hidden) each; and the next input."""
    box: dict = {}

    def grab(name):
        return lambda _m, args: box.__setitem__(name, args[0])

    hooks = [get_matrix(teacher, layer, role).register_forward_pre_hook(grab(role))
             for role in ("attn_out", "ffn_in", "ffn_out")]
    try:
        nxt = _advance(layer_module(teacher, layer), inp)
    finally:
        for h in hooks:
            h.remove()
    attn = get_matrix(teacher, layer, "attn_out")(box["attn_out"]) + _hidden(inp)
    ffn = get_matrix(teacher, layer, "ffn_out")(box["ffn_out"]) + box["ffn_in"]
    return [_valid(attn, inp["mask"]), _valid(ffn, inp["mask"])], nxt


def _capture(model: nn.Module, layer: int, inp: dict, roles: tuple[str, ...]) -> dict:
    """Inputs of the given matrices of ``layer`` on one batch (stops after the last)."""
    box: dict = {}

    def grab(role, last):
        def hook(_m, args):
            box[role] = args[0]
            if last:
                raise _Stop
        return hook

    hooks = [get_matrix(model, layer, r).register_forward_pre_hook(grab(r, r == roles[-1]))
             for r in roles]
    try:
        _call(layer_module(model, layer), inp)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return box


def _solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """Scales s minimising ||A s - t||^2 + lam ||s - 1||^2 (damped towards no rescaling)."""
    lam = damping * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(rhs), dtype=gram.dtype, device=gram.device)
    s = torch.linalg.solve(gram + lam * eye, rhs + lam)
    return s if torch.isfinite(s).all() else torch.ones_like(s)


def _rescale_attn(student, layer, s_inputs, targets, d: Dims, damping) -> torch.Tensor | None:
    core = layer_module(student, layer).get_submodule(get_arch(student).attn_core)
    if isinstance(core, DroppedAttention):
        return None
    out = get_matrix(student, layer, "attn_out")
    k = out.in_features // d.head_size
    gram, rhs = 0, 0
    for inp, (t_attn, _) in zip(s_inputs, targets, strict=True):
        ctx = _valid(_capture(student, layer, inp, ("attn_out",))["attn_out"], inp["mask"])
        w = out.weight.to(ctx).reshape(d.hidden, k, d.head_size)  # (hidden, k, hs)
        u = torch.einsum("nks,hks->nkh", ctx.reshape(-1, k, d.head_size), w)  # head outputs
        r = t_attn - _valid(_hidden(inp), inp["mask"]) - out.bias.to(ctx)  # (n, hidden)
        gram = gram + torch.einsum("nkh,njh->kj", u, u).double()
        rhs = rhs + torch.einsum("nkh,nh->k", u, r).double()
    s = _solve(gram, rhs, damping)
    out.weight.mul_(s.repeat_interleave(d.head_size).to(out.weight))
    return s.cpu()


def _rescale_ffn(student, layer, s_inputs, targets, damping) -> torch.Tensor | None:
    out = get_matrix(student, layer, "ffn_out")
    if not isinstance(out, nn.Linear):  # the whole FFN was dropped
        return None
    zz, rhs = 0, 0
    for inp, (_, t_ffn) in zip(s_inputs, targets, strict=True):
        box = _capture(student, layer, inp, ("ffn_in", "ffn_out"))
        z = _valid(box["ffn_out"], inp["mask"])  # (n, m) neuron activations
        w = out.weight.to(z)  # (hidden, m)
        r = t_ffn - _valid(box["ffn_in"], inp["mask"]) - out.bias.to(z)  # (n, hidden)
        zz = zz + (z.T @ z).double()
        rhs = rhs + (z * (r @ w)).sum(0).double()
    # neuron j adds z_j * w_j to the output: Gram = (Z^T Z) * (W^T W), elementwise
    w = out.weight.double()
    s = _solve(zz * (w.T @ w), rhs, damping)
    out.weight.mul_(s.to(out.weight))
    return s.cpu()


@torch.no_grad()
def rescale(student: nn.Module, teacher: nn.Module, batches: list[dict], damping: float = 0.01,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Kwon's mask tuning on the shrunk ``student`` (in place), layer by layer.

    Targets are the teacher's sublayer output plus residual on the teacher's own stream,
    minus the student's residual and bias, so drift from earlier layers is corrected.
    Returns the scales per sublayer (``"<layer>.attn"``, ``"<layer>.ffn"``).
    """
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    scales = {}
    try:
        s_inputs, t_inputs = _layer0_inputs(student, batches), _layer0_inputs(teacher, batches)
        for layer in tqdm(range(dims_of(student).layers), desc="rescaling",
                          disable=not progress):
            targets, t_inputs = zip(*[_teacher_targets(teacher, layer, i) for i in t_inputs],
                                    strict=True)
            scales[f"{layer}.attn"] = _rescale_attn(student, layer, s_inputs, targets,
                                                    dims_of(student), damping)
            scales[f"{layer}.ffn"] = _rescale_ffn(student, layer, s_inputs, targets, damping)
            s_inputs = [_advance(layer_module(student, layer), i) for i in s_inputs]
    finally:
        student.train(was[0])
        teacher.train(was[1])
    return {k: v for k, v in scales.items() if v is not None}


# ---------------------------------------------------------------- 5. save / load


def save_structured(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Write a shrunk model (from ``shrink``) into an existing folder; ``pgb.load`` reads it.

    The folder holds config.json, structure.json, model.safetensors (the shrunk state
    dict), pgb.json (format and versions) and the tokenizer.
    """
    folder = Path(folder)
    if not model.config.architectures:  # set by save_pretrained; load builds this class
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    (folder / STRUCTURE).write_text(json.dumps(model.pgb_structure.to_json()))
    save_file(weights_state(model), str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / "pgb.json").write_text(json.dumps({
        "format": FORMAT, "pgb_version": __version__, "torch": torch.__version__,
        "transformers": transformers.__version__}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_structured(folder: str | Path) -> nn.Module:
    """Rebuild a shrunk model from its folder: skeleton from config.json, shrink, load."""
    folder = Path(folder)
    try:
        structure = Structure.from_json(json.loads((folder / STRUCTURE).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read {folder / STRUCTURE}: {err}") from err
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise ValueError(f"{folder}/config.json names architecture {config.architectures!r}, "
                         f"unknown to transformers {transformers.__version__}")
    model = shrink(cls(config), structure)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types on truncation
        raise ValueError(f"corrupted checkpoint {folder / WEIGHTS}: {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder / WEIGHTS} does not match {STRUCTURE}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
