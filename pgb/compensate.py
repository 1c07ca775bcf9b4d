"""Weight compensation: refit the surviving weights so each sublayer reproduces the teacher.

Layer by layer, in order, the student's activations are captured from the already-pruned
student (so errors of earlier layers are seen), and the targets from the teacher running
on its own, unpruned stream, so the refit also pulls the student back onto the teacher's
residual stream (all supported families are post-LayerNorm: ``h = LN(x + branch(x))``):

- ``query``/``key``/``value``/``ffn_in``: the teacher's matrix on the teacher's input;
- ``attn_out``/``ffn_out``: ``branch_t(x_t) + x_t - x_s``, the teacher's branch output plus
  the gap between the teacher's and the student's residual, so that the student's
  pre-LayerNorm sum matches the teacher's.

``target="local"`` instead runs the teacher's layer on the student's input (no drift
correction), for comparison.

For the rows of one block (all share the kept input set K) a damped least squares with a
bias column, ``v = T^T X_K (X_K^T X_K + lambda I)^-1`` with ``X_K = [x_K, 1]``, is solved
from accumulated statistics (``prior="zero"``: ridge, weights shrunk towards 0). With
``prior="teacher"`` the damping pulls towards the block's own (teacher) weights ``W_0``
instead, ``v = (T^T X_K + lambda W_0) (X_K^T X_K + lambda I)^-1``: directions the calibration
inputs barely excite keep the teacher's response instead of losing it (lambda -> infinity
is no compensation). ``lambda = damping x`` the mean diagonal of ``X_K^T X_K``; the bias
column is not damped. Rows outside every kept block keep only a bias, set to the
mean target: this is the bias-only compensation of dropped sublayers.

Each layer is passed over five times (the statistics of Q/K/V, attention-out, FFN-in and
FFN-out, then the refitted layer's output). A refitted matrix's inputs and weights do not
change again within its layer, so its output is recorded in the pass after its refit and
replayed in the passes after that (``_Replay``), and so are the attention core and the FFN
activation once all they run is final: the later passes only run what changed, and give
the same tensors. A refitted matrix runs in its compact form (a ``GroupedLinear`` of its
kept blocks, the same function up to float rounding), at about (1 - S) of the dense cost.

Under ``torch.distributed`` every rank passes the whole calibration sample, accumulates the
statistics of its shard and all-reduces them before solving, so every rank solves the same
systems and ends with the same weights as a single process (up to summation order).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import dims_of, get_arch, get_matrix, layer_module
from .config import COMPENSATION_PRIORS as PRIORS
from .config import COMPENSATION_TARGETS as TARGETS
from .distributed import all_reduce_sum, shard
from .grouped_kernels import take_columns
from .grouped_linear import GroupedLinear
from .recipe import Recipe, SublayerPlan
from .surgery import is_identity
from .trace import TeacherTrace, example_keys

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
               damping: float = 0.01, progress: bool = True, target: str = "stream",
               prior: str = "zero", trace: TeacherTrace | None = None) -> None:
    """Refit the masked ``student`` in place so its sublayers match ``teacher`` (see module doc).

    ``trace``: the teacher's activations recorded on the same sample (:mod:`pgb.trace`);
    where it covers every batch, the teacher is not run again (stream targets only)."""
    if target not in TARGETS:
        raise ValueError(f"compensation target must be one of {TARGETS}, got {target!r}")
    if prior not in PRIORS:
        raise ValueError(f"compensation prior must be one of {PRIORS}, got {prior!r}")
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        s_inputs = _layer0_inputs(student, shard(batches),  # this rank's share
                                  keys=trace is not None)
        t_inputs = s_inputs  # embeddings are not pruned: both streams start equal
        keys = [i["keys"] for i in s_inputs]
        traced = trace is not None and target == "stream" and trace.covers(keys)
        if trace is not None and not traced:
            log.info("compensation runs the teacher: the recorded trace does not cover "
                     "the calibration batches")
        replayed = trace.replay(keys) if traced else None  # per layer, in order
        steps = [(layer, *s) for layer in range(dims_of(student).layers) for s in STEPS]
        ref = None
        for layer, kind, roles, branch in tqdm(steps, desc="compensation", disable=not progress):
            if ref is None:  # first step of a layer: the teacher's activations and targets
                if traced:
                    ref, t_next = next(replayed), None
                else:
                    ref, t_next = _teacher_layer(teacher, layer, t_inputs if target == "stream"
                                                 else s_inputs)
                replay = _Replay(student, layer, s_inputs)
            plan = recipe.plan(layer, kind)
            with replay:
                stats = _collect(student, teacher, layer, roles, branch, s_inputs, plan, ref)
            all_reduce_sum(*_stat_tensors(stats))  # sums over every rank's shard
            for role in roles:
                _refit(get_matrix(student, layer, role), stats[role], damping, prior)
            replay.refitted(roles, plan)
            if roles[-1] == "ffn_out":
                with replay:
                    s_inputs = [_advance(layer_module(student, layer), i) for i in s_inputs]
                # the layer's recorded outputs go now, not while the next layer's teacher runs
                t_inputs, ref, replay = t_next, None, None
    finally:
        student.train(was[0])
        teacher.train(was[1])


# The most bytes of recorded matrix outputs one layer's replay holds; beyond it the
# remaining matrices are recomputed in each pass (same results, more time).
REPLAY_BYTES = 2 * 2**30


class _Replay(contextlib.AbstractContextManager):
    """The outputs of one layer's refitted student matrices, replayed in its later passes.

    ``refitted(roles)`` marks matrices whose weights are final; during the next pass
    (``with replay: ...``, one call of the layer per calibration batch, in order) their
    outputs are recorded, and every pass after that returns them instead of running the
    matrix. Q, K and V are refitted first, then attention-out, FFN-in, FFN-out (their order
    in the layer), so a pass always runs the recorded matrices before it stops. A recorded
    output that the model changes in place (its version counter moves) is dropped, and
    that matrix runs again in later passes.

    Two modules around the matrices are replayed the same way once everything they run is
    final: the attention core (``ArchSpec.attn_core``: Q/K/V and the attention itself, with
    attention-out where the family keeps it inside) and the FFN activation
    (``ArchSpec.ffn_act``, final with FFN-in), so the later passes skip the attention and
    the activation as well.
    """

    def __init__(self, student: nn.Module, layer: int, inputs: list[dict]):
        spec, base = get_arch(student), layer_module(student, layer)
        modules = {CORE: base.get_submodule(spec.attn_core), ACT: base.get_submodule(spec.ffn_act)}
        self.linears = lambda role: (modules[role] if role in modules
                                     else get_matrix(student, layer, role))
        self.compact: dict = {}  # role -> the compact forward of a refitted matrix
        # the role whose refit makes each module's output final, and the one giving its width
        core_after = "attn_out" if spec.attn_out_in_core else "value"
        self.derived = {core_after: (CORE, core_after), "ffn_in": (ACT, "ffn_in")}
        # matrices that run only inside the core: never called once the core replays
        self.inside_core = ("query", "key", "value") + (("attn_out",) if spec.attn_out_in_core
                                                        else ())
        self.batches = len(inputs)
        self.tokens = sum(_hidden(i).shape[:-1].numel() for i in inputs)  # padded
        self.pending: list[str] = []
        self.outputs: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.bytes = 0

    def refitted(self, roles: Iterable[str], plan: SublayerPlan | None = None) -> None:
        """Mark ``roles`` final; with their ``plan``, they run in compact form from now on."""
        roles = list(roles)
        for role in roles if plan is not None else ():
            compact = _compact(self.linears(role), plan, role)
            if compact is not None:
                self.compact[role] = compact
        for role, width_of in [(r, r) for r in roles] + [self.derived[r] for r in roles
                                                         if r in self.derived]:
            w = self.linears(width_of).weight
            size = self.tokens * w.shape[0] * w.element_size()
            if self.bytes + size <= REPLAY_BYTES:
                self.pending.append(role)
                self.bytes += size

    def __enter__(self):
        self.recording = {role: [] for role in self.pending}
        self.handles = [self.linears(role).register_forward_hook(self._record(role))
                        for role in self.pending]
        # an instance attribute shadows forward: recorded outputs, else the compact form
        shadows = {**self.compact, **{role: self._replayer(outs)
                                      for role, outs in self.outputs.items()}}
        for role, forward in shadows.items():
            self.linears(role).forward = forward
        self.shadowed = list(shadows)
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for role in self.shadowed:
            del self.linears(role).forward
        for role, outs in self.recording.items():
            if len(outs) == self.batches:  # each batch ran it: replay from now on
                self.outputs[role] = outs
        self.pending = []
        for role, outs in list(self.outputs.items()):
            if any(_first(t)._version != v for t, v in outs):  # changed in place
                del self.outputs[role]
        if CORE in self.outputs:  # its matrices' recorded outputs will not be asked for
            for role in self.inside_core:
                self.outputs.pop(role, None)
        return False

    def _record(self, role: str):
        return lambda _m, _args, out: self.recording[role].append((out, _first(out)._version))

    @staticmethod
    def _replayer(outs: list):
        it = iter(outs)
        return lambda *_args, **_kwargs: next(it)[0]


CORE, ACT = "attn_core", "ffn_act"


def _compact(linear: nn.Module, plan: SublayerPlan, role: str):
    """The forward of a refitted matrix's compact form, or None where that is the dense
    matrix itself (G = 1, every block kept, no permutation) or not an ``nn.Linear``."""
    rows, cols = plan.bands(role)
    kept = list(plan.matrices[role].kept)
    if type(linear) is not nn.Linear or (plan.groups == 1 and kept and is_identity(rows)
                                         and is_identity(cols)):
        return None
    grouped = GroupedLinear.from_dense(linear.weight, linear.bias, plan.groups, kept, rows,
                                       cols, gather_input=not is_identity(cols),
                                       scatter_output=not is_identity(rows))
    grouped.requires_grad_(False)
    return lambda x: run_compact(linear, grouped, x)


def run_compact(linear: nn.Module, grouped: GroupedLinear, x: torch.Tensor) -> torch.Tensor:
    """``linear``'s output through its compact form ``grouped`` (a module-level function, so
    that tests can count the calls per matrix)."""
    return grouped(x)


def _first(out) -> torch.Tensor:
    """The tensor a module returned, or the first of its tuple (attention cores)."""
    return out if torch.is_tensor(out) else next(t for t in out if torch.is_tensor(t))


def _teacher_layer(teacher: nn.Module, layer: int, inputs: list[dict]) -> tuple[list, list]:
    """Run the teacher's layer on ``inputs``; per batch, its valid tokens of: the layer input
    ``x``, the attention branch output ``attn``, the FFN input ``x2`` and the FFN branch output
    ``ffn`` (each (n, H)); and the inputs of the next layer."""
    box: dict = {}

    def pre(name):
        return lambda _m, args: box.__setitem__(name, args[0])

    def post(name):
        return lambda _m, _args, out: box.__setitem__(name, out)

    hooks = [get_matrix(teacher, layer, "query").register_forward_pre_hook(pre("x")),
             get_matrix(teacher, layer, "attn_out").register_forward_hook(post("attn")),
             get_matrix(teacher, layer, "ffn_in").register_forward_pre_hook(pre("x2")),
             get_matrix(teacher, layer, "ffn_out").register_forward_hook(post("ffn"))]
    refs, nxt = [], []
    try:
        for inp in inputs:
            nxt.append(_advance(layer_module(teacher, layer), inp))
            refs.append({k: _tokens(box[k], inp["valid"], copy=True)
                         for k in ("x", "attn", "x2", "ffn")})
    finally:
        for h in hooks:
            h.remove()
    return refs, nxt


def _layer0_inputs(model: nn.Module, batches: Iterable[dict], keys: bool = False) -> list[dict]:
    """(args, kwargs, token mask, valid token positions) entering encoder layer 0, one per
    calibration batch; with ``keys``, also the rows' content keys (:func:`example_keys`)."""
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
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            valid = None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
            out.append({"args": box["args"], "kwargs": box["kwargs"], "mask": mask,
                        "valid": valid, "keys": example_keys(batch) if keys else None})
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


def _tokens(x: torch.Tensor, valid: torch.Tensor | None,
            copy: bool = False) -> torch.Tensor:
    """(B, T, D) -> (n_valid, D) float32: the valid (unpadded) tokens, ``valid`` their flat
    positions (None: all). ``copy``: never a view of ``x`` (for tokens kept beyond the pass
    that produced them).

    Per-batch products run in float32 (fast BLAS; float64 for a float64 model); the sums
    over batches are float64. The bias column of ones is never formed: the products that
    involve it are token sums and counts.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, x.shape[-1])
    if valid is not None:  # a row gather by index, several times faster than by a mask
        return flat.index_select(0, valid).to(dtype)
    out = flat.to(dtype)
    return out.clone() if copy and out.data_ptr() == x.data_ptr() else out


def _add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """Add ``x^T x`` (float32 products) to ``acc`` (float64, possibly a view), from row strips
    of its upper triangle, mirrored: about 2/3 of the multiply-adds of ``x.T @ x`` for 384
    columns and more (3-6 strips measured fastest here; the strips keep the token count as
    the inner dimension, where BLAS runs at full speed). Each strip is added straight into
    ``acc`` (a mixed-precision in-place add): no float32 square and no float64 copy of it."""
    d = x.shape[1]
    if d < 256:
        acc += x.T @ x
        return
    step = -(-d // min(6, d // 128))
    for i in range(0, d, step):
        strip = x[:, i:i + step].T @ x[:, i:]  # rows i..i+s of the upper triangle
        s = strip.shape[0]
        acc[i:i + s, i:] += strip
        acc[i + s:, i:i + s] += strip[:, s:].T


def _gram_cost(d: int) -> float:
    """Multiply-adds per token of :func:`_add_gram` on ``d`` columns."""
    return d * d * (2 / 3 if d >= 256 else 1)


def _collect(student, teacher, layer, roles, branch, inputs, plan: SublayerPlan,
             ref: list[dict]) -> dict:
    """Per role, least-squares statistics over all calibration tokens (padding excluded).

    Only what the kept blocks need is accumulated, so the cost falls with G: per kept block
    b with rows R and inputs K (plus the ones column), ``C_b = X_K^T X_K`` and
    ``cross_b = T_R^T X_K``; for bias-only rows, the sum of targets and the token count.
    """
    box: dict = {}

    def grab_input(_m, args):
        box["x"] = args[0]
        raise _Stop

    def grab_ffn_in(_m, args):
        box["x2"] = args[0]

    s_layer = layer_module(student, layer)
    handles = [get_matrix(student, layer, roles[0]).register_forward_pre_hook(grab_input)]
    if roles[0] == "ffn_out":
        handles.append(get_matrix(student, layer, "ffn_in").register_forward_pre_hook(
            grab_ffn_in))
    stats = {r: _empty_stats(plan, r, get_matrix(student, layer, r).weight) for r in roles}
    sums = None if branch else _AffineSums(stats.values())
    try:
        for inp, t in zip(inputs, ref, strict=True):
            try:
                _call(s_layer, inp)
            except _Stop:
                pass
            x = _tokens(box["x"], inp["valid"])  # (n, in): the student's input
            if roles[0] == "attn_out":  # teacher branch + residual gap
                target = t["attn"] + t["x"] - _tokens(_hidden(inp), inp["valid"])
            elif roles[0] == "ffn_out":
                target = t["ffn"] + t["x2"] - _tokens(box["x2"], inp["valid"])
            if branch:
                for role in roles:
                    _accumulate(stats[role], x, target)
            else:  # the teacher's matrix on the teacher's input: summed for every role
                sums.add(x, t["x" if roles[0] == "query" else "x2"])
    finally:
        for h in handles:
            h.remove()
    for role in () if branch else roles:
        sums.fill(stats[role], _affine(get_matrix(teacher, layer, role)).to(sums.tx))
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
    rows, cols = rows.to(weight.device), cols.to(weight.device)  # index the model's tensors
    for b in plan.matrices[role].kept:
        r = rows[b * rb:(b + 1) * rb]
        k = torch.cat([cols[b * cb:(b + 1) * cb], cols.new_tensor([n_in])])
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


def _accumulate(st: dict, x: torch.Tensor, target: torch.Tensor) -> None:
    """Add one batch to a role's statistics: inputs x (n, in), targets (n, out); the bias
    column of ones enters as token sums and counts."""
    n = x.shape[0]
    t_sum = target.sum(0).double()
    st["n"] += n
    st["tsum"] += t_sum
    if not st["blocks"]:
        return
    (cols, cols32), (rows, rows32) = _joined(st)
    # every block's columns, in turn
    xs, ts = take_columns(x, cols, cols32), take_columns(target, rows, rows32)
    i = j = 0
    for blk in st["blocks"]:
        k, r = len(blk["cols"]) - 1, len(blk["rows"])
        xk, tk = xs[:, i:i + k], ts[:, j:j + r]  # strided views: BLAS reads them in place
        i, j = i + k, j + r
        x_sum = xk.sum(0).double()
        c, cross = blk["c"], blk["cross"]
        _add_gram(c[:-1, :-1], xk)
        c[:-1, -1] += x_sum
        c[-1, :-1] += x_sum
        c[-1, -1] += n
        cross[:, :-1] += tk.T @ xk
        cross[:, -1] += t_sum[blk["rows"]]


def _joined(st: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The kept blocks' input columns and output rows, each concatenated block after block
    and also as int32 (for the native gather; kept in ``st``): a batch is gathered once
    per role, not once per block. A column gather costs several times a copy, and one
    gather of all the columns costs less than many small ones."""
    if "joined" not in st:
        st["joined"] = tuple((i, i.to(torch.int32)) for i in (
            torch.cat([blk["cols"][:-1] for blk in st["blocks"]]),
            torch.cat([blk["rows"] for blk in st["blocks"]])))
    return st["joined"]


class _AffineSums:
    """Sums over the batches for roles whose targets are ``T = [t_in, 1] @ a.T`` (Q, K, V
    and FFN-in, on one input ``x``): ``t_in^T x``, both token sums, the token count and,
    per distinct kept column set K of the roles' blocks, ``x_K^T x_K``. Each role's
    statistics are linear in these (``C_b`` is made of them and ``T_R^T X_K = a_R [t_in,
    1]^T [x_K, 1]``), so :meth:`fill` derives them once after the last batch: Q, K and V
    share the token-sized work, and the FFN-in targets (4x wider than its input) are never
    formed.

    Where one product ``x^T x`` costs fewer multiply-adds than one per distinct K (Q, K and
    V at G = 2: six sets of half the columns, 2.2x the work of the whole), only it is
    accumulated and each ``x_K^T x_K`` is read out of it: the same sums, and no column
    gathers of the tokens.
    """

    def __init__(self, stats: Iterable[dict]):
        stats = list(stats)
        self.zeros = dict(dtype=torch.float64, device=stats[0]["tsum"].device)
        self.grams: dict[tuple, list] = {}  # distinct K -> [K, x_K^T x_K (or None: whole)]
        for st in stats:
            for blk in st["blocks"]:
                cols = blk["cols"][:-1]
                self.grams.setdefault(tuple(cols.tolist()), [cols, None])
        self.whole = None  # x^T x, where it is the cheaper way (decided at the first batch)
        self.joined = None  # else every K's columns, concatenated: one gather per batch
        self.joined32 = None  # the same as int32, for the native gather
        self.tx = self.t_sum = self.x_sum = None  # sized by the first batch
        self.n = 0

    def add(self, x: torch.Tensor, t_in: torch.Tensor) -> None:
        """One batch: the student's inputs ``x`` and the teacher's ``t_in``, (n, in) each."""
        if self.tx is None:
            d = x.shape[1]
            self.tx = torch.zeros(d, d, **self.zeros)
            self.t_sum, self.x_sum = (torch.zeros(d, **self.zeros) for _ in range(2))
            if sum(_gram_cost(len(key)) for key in self.grams) >= _gram_cost(d):
                self.whole = torch.zeros(d, d, **self.zeros)
            else:
                for entry in self.grams.values():
                    entry[1] = torch.zeros(len(entry[0]), len(entry[0]), **self.zeros)
                keys = [cols for cols, _ in self.grams.values()]
                if keys:  # else None: no kept block
                    self.joined = torch.cat(keys)
                    self.joined32 = self.joined.to(torch.int32)
        self.n += x.shape[0]
        self.tx += t_in.T @ x
        self.t_sum += t_in.sum(0)
        self.x_sum += x.sum(0)
        if self.whole is not None:
            _add_gram(self.whole, x)
            return
        if self.joined is None:
            return
        xs = take_columns(x, self.joined, self.joined32)  # every K's columns: one gather
        i = 0
        for cols, g in self.grams.values():
            _add_gram(g, xs[:, i:i + len(cols)])
            i += len(cols)

    def gram(self, cols: torch.Tensor) -> torch.Tensor:
        """The accumulated ``x_K^T x_K`` of the kept column set ``cols`` (K)."""
        if self.whole is not None:
            return self.whole.index_select(0, cols).index_select(1, cols)
        return self.grams[tuple(cols.tolist())][1]

    def fill(self, st: dict, a: torch.Tensor) -> None:
        """Add the sums' statistics to one role's ``st`` (see ``_empty_stats``); ``a``: the
        role's teacher ``[W, b]``, (out, in + 1) float64."""
        if self.tx is None:  # no batch on this rank: nothing to add
            return
        d, n = self.tx.shape[0], float(self.n)
        t_x = self.tx.new_empty(d + 1, d + 1)  # [t_in, 1]^T [x, 1]
        t_x[:-1, :-1], t_x[:-1, -1], t_x[-1, :-1], t_x[-1, -1] = (
            self.tx, self.t_sum, self.x_sum, n)
        st["n"] += n
        st["tsum"] += a @ t_x[:, -1]
        for blk in st["blocks"]:
            k = blk["cols"]
            x_sum = self.x_sum[k[:-1]]
            c = blk["c"]
            c[:-1, :-1] += self.gram(k[:-1])
            c[:-1, -1] += x_sum
            c[-1, :-1] += x_sum
            c[-1, -1] += n
            blk["cross"] += a[blk["rows"]] @ t_x[:, k]


def _affine(linear: nn.Module) -> torch.Tensor:
    """[W, b] of a linear layer, (out, in + 1) float32."""
    return torch.cat([linear.weight.float(), linear.bias.float().unsqueeze(1)], dim=1)


def _refit(linear: nn.Module, st: dict, damping: float, prior: str = "zero") -> None:
    """Solve each kept block's damped least squares; write weights and biases in place.
    ``prior``: what the damping pulls the weights towards, 0 or their current values."""
    weight = torch.zeros_like(linear.weight, dtype=torch.float64)
    # Rows outside every kept block keep a bias only: the mean target.
    bias = st["tsum"] / st["n"].clamp_min(1)
    for blk in st["blocks"]:
        h = blk["c"].clone()
        diag = h.diagonal()[:-1]  # the weights' diagonal; the bias column is not damped
        lam = damping * diag.mean().clamp_min(1e-8)
        diag += lam
        r, k = blk["rows"], blk["cols"][:-1]
        rhs = blk["cross"].T.clone()  # (|K| + 1, rows)
        if prior == "teacher":
            rhs[:-1] += lam * linear.weight[r.unsqueeze(1), k.unsqueeze(0)].double().T
        v = torch.linalg.solve(h, rhs).T  # (rows, |K| + 1)
        weight[r.unsqueeze(1), k.unsqueeze(0)] = v[:, :-1]
        bias[r] = v[:, -1]
    linear.weight.copy_(weight.to(linear.weight))
    linear.bias.copy_(bias.to(linear.bias))
