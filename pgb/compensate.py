"""Weight compensation: refit the surviving weights so each sublayer reproduces the teacher.

Layer by layer, in order, on calibration activations captured from the already-pruned
student (so errors of earlier layers are seen and corrected):

- ``query``/``key``/``value``/``ffn_in``: target = the teacher's matrix on the student's
  input, ``T = x W_t^T + b_t``;
- ``attn_out``/``ffn_out``: target = the teacher's whole branch (attention, or FFN) on the
  student's sublayer input, so errors of the first matrices are corrected too.

For the rows of one block (all share the kept input set K) a damped least squares with a
bias column, ``v = T^T X_K (X_K^T X_K + lambda I)^-1`` with ``X_K = [x_K, 1]``, is solved
from accumulated (in+1) x (in+1) statistics. Rows outside every kept block keep only a
bias, set to the mean target: this is the bias-only compensation of dropped sublayers.

Under ``torch.distributed`` every rank passes the whole calibration sample, accumulates the
statistics of its shard and all-reduces them before solving, so every rank solves the same
systems and ends with the same weights as a single process (up to summation order).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import dims_of, get_arch, get_matrix, layer_module
from .distributed import all_reduce_sum, shard
from .recipe import Recipe, SublayerPlan

log = logging.getLogger(__name__)

# (sublayer, matrices refitted together, whether the target is the teacher's whole branch)
STEPS = (("attn", ("query", "key", "value"), False), ("attn", ("attn_out",), True),
         ("ffn", ("ffn_in",), False), ("ffn", ("ffn_out",), True))


class _Stop(Exception):
    """Raised inside a hook once the needed activations are captured."""


def apply_masks(model: nn.Module, recipe: Recipe) -> None:
    """Zero every weight outside the recipe's kept blocks (the masked dense reference)."""
    with torch.no_grad():
        for plan in recipe.sublayers:
            for role in plan.matrices:
                w = get_matrix(model, plan.layer, role).weight
                w.mul_(plan.mask(role).to(w))


@torch.no_grad()
def compensate(student: nn.Module, teacher: nn.Module, recipe: Recipe, batches: Iterable[dict],
               damping: float = 0.01, progress: bool = True) -> None:
    """Refit the masked ``student`` in place so its sublayers match ``teacher`` (see module doc)."""
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        inputs = _layer0_inputs(student, shard(batches))  # this rank's share
        steps = [(layer, *s) for layer in range(dims_of(student).layers) for s in STEPS]
        for layer, kind, roles, branch in tqdm(steps, desc="compensation", disable=not progress):
            plan = recipe.plan(layer, kind)
            stats = _collect(student, teacher, layer, roles, branch, inputs, plan)
            all_reduce_sum(*_stat_tensors(stats))  # sums over every rank's shard
            for role in roles:
                _refit(get_matrix(student, layer, role), stats[role], damping)
            if (kind, roles[-1]) == ("ffn", "ffn_out"):
                inputs = [_advance(layer_module(student, layer), i) for i in inputs]
    finally:
        student.train(was[0])
        teacher.train(was[1])


def _layer0_inputs(model: nn.Module, batches: Iterable[dict]) -> list[dict]:
    """(args, kwargs, token mask) entering encoder layer 0, one per calibration batch."""
    box = {}

    def grab(_module, args, kwargs):
        box["args"], box["kwargs"] = args, kwargs
        raise _Stop

    handle = layer_module(model, 0).register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    out = []
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            try:
                model(**{k: v for k, v in batch.items() if not k.endswith(("labels", "positions"))})
            except _Stop:
                pass
            mask = batch.get("attention_mask", torch.ones(batch["input_ids"].shape))
            out.append({"args": box["args"], "kwargs": box["kwargs"], "mask": mask.bool()})
    finally:
        handle.remove()
    return out


def _hidden(inp: dict) -> torch.Tensor:
    return inp["args"][0] if inp["args"] else inp["kwargs"]["hidden_states"]


def _with_hidden(inp: dict, hidden: torch.Tensor) -> dict:
    if inp["args"]:
        return {**inp, "args": (hidden, *inp["args"][1:])}
    return {**inp, "kwargs": {**inp["kwargs"], "hidden_states": hidden}}


def _call(module: nn.Module, inp: dict):
    return module(*inp["args"], **inp["kwargs"])


def _advance(layer: nn.Module, inp: dict) -> dict:
    out = _call(layer, inp)
    return _with_hidden(inp, out[0] if isinstance(out, tuple) else out)


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (n_valid, D + 1) float32, with a trailing column of ones for the bias.

    Per-batch products run in float32 (fast BLAS; float64 for a float64 model); the sums
    over batches are float64.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.reshape(-1, x.shape[-1])[mask.reshape(-1)].to(dtype)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _collect(student, teacher, layer, roles, branch, inputs, plan: SublayerPlan) -> dict:
    """Per role, least-squares statistics over all calibration tokens (padding excluded).

    Only what the kept blocks need is accumulated, so the cost falls with G: per kept block
    b with rows R and inputs K (plus the ones column), ``C_b = X_K^T X_K`` and
    ``cross_b = T_R^T X_K``; for bias-only rows, the sum of targets and the token count.
    """
    spec = get_arch(student)
    s_layer, t_layer = layer_module(student, layer), layer_module(teacher, layer)
    box: dict = {}

    def grab_input(_m, args):
        box["x"] = args[0]
        raise _Stop

    def grab_core(_m, args, kwargs):
        box["core"] = (args, kwargs)

    def grab_ffn_in(_m, args):
        box["ffn_x"] = args[0]

    handles = [get_matrix(student, layer, roles[0]).register_forward_pre_hook(grab_input)]
    if branch and roles[0] == "attn_out":
        core = s_layer.get_submodule(spec.attn_core)
        handles.append(core.register_forward_pre_hook(grab_core, with_kwargs=True))
    if branch and roles[0] == "ffn_out":
        ffn_in = get_matrix(student, layer, "ffn_in")
        handles.append(ffn_in.register_forward_pre_hook(grab_ffn_in))
    affine = {r: _affine(get_matrix(teacher, layer, r)) for r in roles}
    stats = {r: _empty_stats(plan, r, get_matrix(student, layer, r).weight) for r in roles}
    try:
        for inp in inputs:
            try:
                _call(s_layer, inp)
            except _Stop:
                pass
            x = _tokens(box["x"], inp["mask"])  # (n, in + 1)
            target = _branch_target(teacher, t_layer, spec, layer, roles[0], box, inp) \
                if branch else None
            for role in roles:
                _accumulate(stats[role], x, target, affine[role].to(x))
    finally:
        for h in handles:
            h.remove()
    return stats


def _empty_stats(plan: SublayerPlan, role: str, weight: torch.Tensor) -> dict:
    """Zero statistics of one role: per kept block, its rows and input columns (with the
    ones column last), ``c`` (|K|+1, |K|+1) and ``cross`` (|R|, |K|+1); the target sum
    (out,) and the token count. Float64 tensors on the model's device, so that a rank with
    no batch still takes part in the all-reduce.
    """
    zeros = dict(dtype=torch.float64, device=weight.device)
    rows, cols = plan.bands(role)
    g, n_in = plan.groups, len(cols)
    rb, cb = len(rows) // g, len(cols) // g
    blocks = []
    for b in plan.matrices[role].kept:
        r = rows[b * rb:(b + 1) * rb]
        k = torch.cat([cols[b * cb:(b + 1) * cb], torch.tensor([n_in])])
        blocks.append({"rows": r, "cols": k, "c": torch.zeros(len(k), len(k), **zeros),
                       "cross": torch.zeros(len(r), len(k), **zeros)})
    return {"blocks": blocks, "tsum": torch.zeros(weight.shape[0], **zeros),
            "n": torch.zeros((), **zeros)}


def _stat_tensors(stats: dict) -> list[torch.Tensor]:
    """Every accumulated tensor of ``_collect``'s statistics (what the ranks sum)."""
    out = []
    for st in stats.values():
        out += [st["tsum"], st["n"]]
        out += [blk[key] for blk in st["blocks"] for key in ("c", "cross")]
    return out


def _accumulate(st: dict, x: torch.Tensor, target: torch.Tensor | None,
                affine: torch.Tensor) -> None:
    """Add one batch to a role's statistics; target None means ``x @ affine^T``."""
    st["n"] += x.shape[0]
    st["tsum"] += (target.sum(0) if target is not None else x.sum(0) @ affine.T).double()
    for blk in st["blocks"]:
        xk = x[:, blk["cols"]]  # (n, |K| + 1)
        t = target[:, blk["rows"]] if target is not None else x @ affine[blk["rows"]].T
        blk["c"] += (xk.T @ xk).double()
        blk["cross"] += (t.T @ xk).double()


def _affine(linear: nn.Module) -> torch.Tensor:
    """[W, b] of a linear layer, (out, in + 1) float32."""
    return torch.cat([linear.weight.float(), linear.bias.float().unsqueeze(1)], dim=1)


def _branch_target(teacher, t_layer, spec, layer, role, box, inp) -> torch.Tensor:
    """The teacher's whole attention or FFN branch on the student's sublayer input."""
    if role == "attn_out":
        args, kwargs = box["core"]
        out = t_layer.get_submodule(spec.attn_core)(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if not spec.attn_out_in_core:
            out = get_matrix(teacher, layer, "attn_out")(out)
    else:
        act = t_layer.get_submodule(spec.ffn_act)
        out = get_matrix(teacher, layer, "ffn_out")(act(get_matrix(teacher, layer, "ffn_in")(
            box["ffn_x"])))
    return _tokens(out, inp["mask"])[:, :-1]


def _refit(linear: nn.Module, st: dict, damping: float) -> None:
    """Solve each kept block's damped least squares; write weights and biases in place."""
    weight = torch.zeros_like(linear.weight, dtype=torch.float64)
    # Rows outside every kept block keep a bias only: the mean target.
    bias = st["tsum"] / st["n"].clamp_min(1)
    for blk in st["blocks"]:
        h = blk["c"].clone()
        diag = h.diagonal()[:-1]  # the weights' diagonal; the bias column is not damped
        diag += damping * diag.mean().clamp_min(1e-8)
        v = torch.linalg.solve(h, blk["cross"].T).T  # (rows, |K| + 1)
        r, k = blk["rows"], blk["cols"][:-1]
        weight[r.unsqueeze(1), k.unsqueeze(0)] = v[:, :-1]
        bias[r] = v[:, -1]
    linear.weight.copy_(weight.to(linear.weight))
    linear.bias.copy_(bias.to(linear.bias))
