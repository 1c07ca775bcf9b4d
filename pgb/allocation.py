"""Adaptive group counts: choose G per sublayer (or drop it) to meet a global sparsity.

A multiple-choice knapsack: each sublayer offers one option per candidate G (all G blocks
kept, 1/G of its weights) plus "drop" (nothing kept). Phase 1 walks every sublayer down
the upper convex hull of its (weights kept, importance kept) options, always taking the
step that loses the least importance per weight saved, and stops before the budget would
be overshot. Phase 2 removes single weak blocks (least importance per weight first) until
the budget is met, so the achieved sparsity lands on the target to within one small block.
A sublayer whose matrices end with no block is dropped.

With coarse blocks (tiny models, small --max-groups, --no-drop) the greedy can miss the
target by more than ``WARN_MISS`` although a closer allocation exists. Then an exact
fallback runs: a dynamic program over sublayers on the kept-weight total, whose options per
sublayer are a candidate G with any number of its blocks (each matrix keeping its
highest-scoring ones) or, when allowed, the drop. Among the totals within ``WARN_MISS`` it
takes the allocation of best objective value. It runs only while the grid of totals (in
units of the gcd of all block sizes) has at most ``EXACT_STATES`` points; otherwise, or
when no total is within reach, the greedy result stands. A greedy result that meets the
target is never changed.

Example::

    >>> recipe = allocate(groupings, dims, "bert", sparsity=0.5)
    >>> round(recipe.sparsity(), 3)
    0.5
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import numpy as np

from .arch import SUBLAYERS, Dims
from .grouping import Grouping
from .recipe import MatrixPlan, Recipe, SublayerPlan

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (layer, "attn" | "ffn")


@dataclass(frozen=True)
class _Option:
    groups: int  # 0 means "drop"
    weights: int
    value: float


def _sizes(dims: Dims) -> dict[str, int]:
    return {"attn": dims.hidden * dims.hidden, "ffn": dims.hidden * dims.intermediate}


OBJECTIVES = ("log", "linear")
LOG_FLOOR = 0.01  # retained fraction credited to a dropped matrix by the "log" objective
WARN_MISS = 0.005  # a larger miss of the target is warned about and tried exactly
EXACT_STATES = 200_000  # the exact fallback's largest grid of kept-weight totals


def _matrix_value(kept: float, total: float, objective: str) -> float:
    """Value of keeping importance ``kept`` of a matrix whose importance is ``total``."""
    if objective == "linear":
        return kept
    return total * math.log(max(kept / max(total, 1e-30), LOG_FLOOR))


def _value(gr: Grouping | None, objective: str) -> float:
    """What an option keeps: importance mass ("linear"), or sum over matrices of
    total * log(retained fraction) ("log"), which makes each further loss in an already
    thinned matrix cost more. ``gr`` None is the drop option."""
    if gr is None:
        return 0.0  # see _drop_value (needs the totals)
    return float(sum(_matrix_value(gr.block_scores[m].sum(), t, objective)
                     for m, t in gr.totals.items()))


def _drop_value(totals: dict[str, float], objective: str) -> float:
    """Value of dropping a sublayer whose matrices hold importance ``totals``."""
    return 0.0 if objective == "linear" else sum(totals.values()) * math.log(LOG_FLOOR)


def _options(kind: str, by_g: dict[int, Grouping], dims: Dims, allow_drop: bool,
             objective: str) -> list[_Option]:
    n_mats, size = len(SUBLAYERS[kind]), _sizes(dims)[kind]
    opts = [_Option(g, n_mats * size // g, _value(gr, objective)) for g, gr in by_g.items()]
    if allow_drop:
        opts.append(_Option(0, 0, _drop_value(next(iter(by_g.values())).totals, objective)))
    return _upper_hull(sorted(opts, key=lambda o: -o.weights))


def _upper_hull(opts: list[_Option]) -> list[_Option]:
    """Options on the concave upper hull of value vs weights, by decreasing weights."""
    hull: list[_Option] = []
    for o in opts:
        if hull and o.value >= hull[-1].value:  # cheaper and at least as good: dominates
            while hull and o.value >= hull[-1].value:
                hull.pop()
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def _slope(a: _Option, b: _Option) -> float:
    """Importance lost per weight saved going from a to b."""
    return (a.value - b.value) / max(a.weights - b.weights, 1)


def allocate(groupings: dict[Key, dict[int, Grouping]], dims: Dims, model_type: str,
             sparsity: float, uniform: int | None = None, allow_drop: bool = True,
             tolerance: float = 0.002, objective: str = "log") -> Recipe:
    """Choose a grouping per sublayer meeting ``sparsity`` (fraction of encoder linear weights).

    uniform: force this G everywhere (the uniform-G ablation; no drops), then trim blocks.
    objective: "log" (default) or "linear", see ``_value``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if objective not in OBJECTIVES:
        raise ValueError(f"allocation objective must be one of {OBJECTIVES}, got {objective!r}")
    total = dims.layers * sum(len(SUBLAYERS[k]) * n for k, n in _sizes(dims).items())
    budget = (1.0 - sparsity) * total
    if uniform is not None:
        choice = {k: uniform for k in groupings}
        for k, by_g in groupings.items():
            if uniform not in by_g:
                raise ValueError(f"uniform G {uniform} is not a candidate for sublayer {k}; "
                                 f"candidates: {sorted(by_g)}")
    else:
        choice = _phase1(groupings, dims, budget, allow_drop, objective)
    kept = {k: _all_blocks(k[1], g) for k, g in choice.items()}
    _phase2(groupings, choice, kept, dims, budget, tolerance * total, allow_drop, objective)
    recipe = _recipe(groupings, choice, kept, dims, model_type)
    if abs(recipe.sparsity() - sparsity) > WARN_MISS:  # coarse blocks: try the exact search
        pool = groupings if uniform is None else \
            {k: {uniform: by_g[uniform]} for k, by_g in groupings.items()}
        exact = _exact(pool, dims, sparsity, allow_drop, objective)
        if exact is not None:
            choice, kept = exact
            if uniform is not None:  # a sublayer emptied in the ablation keeps its G
                choice = dict.fromkeys(choice, uniform)
            recipe = _recipe(groupings, choice, kept, dims, model_type)
    _check_budget(recipe, sparsity, groupings, allow_drop)
    return recipe


def _check_budget(recipe: Recipe, sparsity: float, groupings, allow_drop: bool,
                  warn_miss: float = WARN_MISS, max_miss: float = 0.05) -> None:
    """Warn when the achieved sparsity misses the target by more than half a point; refuse
    a miss above ``max_miss`` (5 points): that model is not the one asked for.

    Misses come from coarse blocks: with G=1 a block is a whole matrix, so small --max-groups,
    --no-drop or tiny models can leave no allocation near the target.
    """
    achieved = recipe.sparsity()
    miss = abs(achieved - sparsity)
    if miss <= warn_miss:
        return
    largest = max((g for by_g in groupings.values() for g in by_g), default=1)
    fixes = [f"allow more groups (--max-groups; the largest candidate G is {largest})"]
    if not allow_drop:
        fixes.append("allow dropping whole sublayers (remove --no-drop / --uniform-groups)")
    text = (f"cannot meet sparsity {sparsity:g}: the closest allocation found removes "
            f"{achieved:.4f} of the encoder linear weights; {' or '.join(fixes)}, or choose "
            f"a sparsity near {achieved:.3f}")
    if miss > max_miss:
        raise ValueError(text)
    log.warning("%s (continuing: the miss is under %g)", text, max_miss)


def _phase1(groupings, dims, budget, allow_drop, objective) -> dict[Key, int]:
    hulls = {k: _options(k[1], by_g, dims, allow_drop, objective)
             for k, by_g in groupings.items()}
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0].weights for h in hulls.values())
    heap = [(_slope(h[0], h[1]), k) for k, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap and used > budget:
        _, k = heapq.heappop(heap)
        a, b = hulls[k][pos[k]], hulls[k][pos[k] + 1]
        if used - (a.weights - b.weights) < budget:
            continue  # this step overshoots; phase 2 trims single blocks instead
        used -= a.weights - b.weights
        pos[k] += 1
        if pos[k] + 1 < len(hulls[k]):
            heapq.heappush(heap, (_slope(hulls[k][pos[k]], hulls[k][pos[k] + 1]), k))
    return {k: hulls[k][pos[k]].groups for k in hulls}


def _all_blocks(kind: str, groups: int) -> dict[str, list[int]]:
    return {r: list(range(groups)) for r in SUBLAYERS[kind]} if groups else \
        {r: [] for r in SUBLAYERS[kind]}


def _phase2(groupings, choice, kept, dims, budget, slack, allow_drop: bool = True,
            objective: str = "log") -> None:
    """Drop single weak blocks until the kept weights fit the budget.

    A block's cost is its importance per weight; under the "log" objective it is divided by
    its matrix's retained fraction (the first-order change of total * log(retained)).
    Without ``allow_drop`` a sublayer keeps its last block (else it would be dropped)."""
    size = _sizes(dims)
    used = sum(size[k[1]] // g * len(SUBLAYERS[k[1]]) for k, g in choice.items() if g)
    cands = []  # (importance per weight, block weights, key, role, block)
    for k, g in choice.items():
        if not g:
            continue
        block = size[k[1]] // (g * g)
        gr = groupings[k][g]
        for role, scores in gr.block_scores.items():
            scale = 1.0 if objective == "linear" else \
                max(scores.sum() / max(gr.totals[role], 1e-30), LOG_FLOOR)
            cands += [(float(s) / block / scale, block, k, role, b)
                      for b, s in enumerate(scores)]
    cands.sort(key=lambda c: c[0])
    smallest = min((c[1] for c in cands), default=0)
    for strict in (True, False):  # second pass: whatever it takes to meet the budget
        for _ratio, block, k, role, b in cands:
            if used <= budget:
                return
            if b not in kept[k][role] or \
                    (strict and used - block < budget - slack and block > smallest):
                continue  # too coarse: finer blocks get closer to the budget
            if not allow_drop and sum(map(len, kept[k].values())) == 1:
                continue  # the sublayer's last block: --no-drop forbids dropping it
            kept[k][role].remove(b)
            used -= block


def _exact(groupings: dict[Key, dict[int, Grouping]], dims: Dims, sparsity: float,
           allow_drop: bool, objective: str
           ) -> tuple[dict[Key, int], dict[Key, dict[str, list[int]]]] | None:
    """(choice, kept) of best value among the allocations within ``WARN_MISS`` of
    ``sparsity``, by dynamic programming over sublayers on the kept-weight total; None when
    there is none or the grid of totals exceeds ``EXACT_STATES``."""
    size = _sizes(dims)
    unit = math.gcd(*(size[k[1]] // (g * g) for k, by_g in groupings.items() for g in by_g))
    total = dims.layers * sum(len(SUBLAYERS[k]) * n for k, n in size.items())
    if not unit or total // unit >= EXACT_STATES:
        return None
    n = total // unit + 1
    val = np.full(n, -np.inf)  # best value per kept total (in units), -inf: out of reach
    val[0] = 0.0
    steps = []  # per sublayer: its options and, per total, the option that reached it
    for k, by_g in groupings.items():
        opts = list(_exact_options(k[1], by_g, dims, unit, allow_drop, objective).items())
        new, arg = np.full(n, -np.inf), np.full(n, -1, dtype=np.int32)
        for j, (w, (v, _, _)) in enumerate(opts):
            cand = val[:n - w] + v
            better = cand > new[w:]
            new[w:][better] = cand[better]
            arg[w:][better] = j
        steps.append((k, opts, arg))
        val = new
    miss = np.abs(1.0 - np.arange(n) * unit / total - sparsity)  # as Recipe.sparsity counts
    ok = np.flatnonzero((miss <= WARN_MISS) & np.isfinite(val))
    if not len(ok):
        return None
    at = int(ok[np.lexsort((miss[ok], -val[ok]))[0]])  # best value, then the closest
    choice, kept = {}, {}
    for k, opts, arg in reversed(steps):
        w, (_, g, counts) = opts[arg[at]]
        at -= w
        choice[k] = g
        kept[k] = {r: sorted(int(b) for b in np.argsort(-groupings[k][g].block_scores[r],
                                                         kind="stable")[:counts[r]])
                   for r in SUBLAYERS[k[1]]} if g else _all_blocks(k[1], 0)
    return choice, kept


def _exact_options(kind: str, by_g: dict[int, Grouping], dims: Dims, unit: int,
                   allow_drop: bool, objective: str) -> dict[int, tuple[float, int, dict]]:
    """Per kept total (in units) of one sublayer, its best option: (value, G or 0 for the
    drop, kept blocks per matrix). A kept G keeps at least one block."""
    size = _sizes(dims)[kind]
    best: dict[int, tuple[float, int, dict]] = {}
    if allow_drop:
        best[0] = (_drop_value(next(iter(by_g.values())).totals, objective), 0, {})
    for g, gr in by_g.items():
        block = size // (g * g) // unit
        for m, (v, counts) in _splits(gr, objective).items():
            if m and v > best.get(m * block, (-math.inf,))[0]:
                best[m * block] = (v, g, counts)
    return best


def _splits(gr: Grouping, objective: str) -> dict[int, tuple[float, dict[str, int]]]:
    """Per number of kept blocks, the best value and how many each matrix keeps (its
    highest-scoring ones)."""
    best: dict[int, tuple[float, dict[str, int]]] = {0: (0.0, {})}
    for role, t in gr.totals.items():
        top = np.concatenate([[0.0], np.cumsum(np.sort(gr.block_scores[role])[::-1])])
        values = [_matrix_value(float(s), t, objective) for s in top]
        new: dict[int, tuple[float, dict[str, int]]] = {}
        for m, (v, counts) in best.items():
            for c, vc in enumerate(values):
                if v + vc > new.get(m + c, (-math.inf,))[0]:
                    new[m + c] = (v + vc, {**counts, role: c})
        best = new
    return best


def _recipe(groupings, choice, kept, dims, model_type) -> Recipe:
    plans = []
    for (layer, kind), g in sorted(choice.items()):
        if g:  # a kept grouping: its permutations
            gr = groupings[(layer, kind)][g]
            inner = tuple(int(i) for i in gr.inner_perm)
            outer = {r: tuple(int(i) for i in gr.outer_perms[r]) for r in SUBLAYERS[kind]}
        else:  # dropped: nothing kept, identity orders
            inner = tuple(range(dims.hidden if kind == "attn" else dims.intermediate))
            outer = dict.fromkeys(SUBLAYERS[kind], tuple(range(dims.hidden)))
        mats = {r: MatrixPlan(outer[r], tuple(kept[(layer, kind)][r])) for r in SUBLAYERS[kind]}
        plans.append(SublayerPlan(layer, kind, g or 1, inner, mats))
    return Recipe(model_type, dims, tuple(plans))


def retained_importance(recipe: Recipe, groupings: dict[Key, dict[int, Grouping]]) -> list[dict]:
    """Per matrix: name, groups, kept blocks and the fraction of its importance kept."""
    rows = []
    for p in recipe.sublayers:
        gr = groupings[(p.layer, p.kind)].get(p.groups)
        for role, m in p.matrices.items():
            kept = float(sum(gr.block_scores[role][b] for b in m.kept)) if m.kept else 0.0
            total = gr.totals[role] if gr else next(iter(groupings[(p.layer, p.kind)].values()))\
                .totals[role]
            rows.append({"name": f"{p.layer}.{role}", "groups": p.groups,
                         "kept_blocks": len(m.kept),
                         "retained_importance": kept / max(total, 1e-30)})
    return rows
