"""Property-based tests (hypothesis) of the grouping search, the allocator and the recipe.

Shapes are small and drawn at random (G, heads, head size, FFN width, number of matrices);
scores come from a seeded generator raised to a random power, so some draws spread the
importance evenly and others concentrate it on a few weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgb.allocation import allocate
from pgb.arch import ATTN_MATRICES, FFN_MATRICES, SUBLAYERS, Dims
from pgb.grouping import balanced_assign, candidate_groups, search_sublayer
from pgb.recipe import MatrixPlan, Recipe, SublayerPlan

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def random_scores(seed: int, power: float, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) ** power


@st.composite
def ffn_case(draw):
    """(scores, G, heads=None, fixed=False): FFN matrices oriented (inner, outer)."""
    g = draw(st.sampled_from([1, 2, 3, 4, 6]))
    inner, outer = g * draw(st.integers(1, 6)), g * draw(st.integers(1, 4))
    seed, power = draw(st.integers(0, 2**31)), draw(st.floats(0.5, 6.0))
    roles = FFN_MATRICES[:draw(st.integers(1, 2))]
    scores = {r: random_scores(seed + i, power, (inner, outer)) for i, r in enumerate(roles)}
    return scores, g, None, False


@st.composite
def attn_case(draw):
    """(scores, G, heads, fixed head order): attention matrices, inner = heads x head size."""
    heads, head_size = draw(st.sampled_from([1, 2, 3, 4, 6])), draw(st.integers(1, 4))
    hidden = heads * head_size
    g = draw(st.sampled_from([d for d in range(1, hidden + 1) if hidden % d == 0]))
    seed, power = draw(st.integers(0, 2**31)), draw(st.floats(0.5, 6.0))
    roles = ATTN_MATRICES[:draw(st.integers(1, 4))]
    scores = {r: random_scores(seed + i, power, (hidden, hidden)) for i, r in enumerate(roles)}
    return scores, g, heads, draw(st.booleans())


def block_mask(grouping, role: str, shape: tuple[int, int]) -> np.ndarray:
    """How many kept blocks cover each (inner, outer) position; block b is band b x band b."""
    n, h = shape
    g = grouping.groups
    inner, outer = grouping.inner_perm, grouping.outer_perms[role]
    mask = np.zeros(shape, dtype=np.int64)
    for b in range(g):
        mask[np.ix_(inner[b * n // g:(b + 1) * n // g], outer[b * h // g:(b + 1) * h // g])] += 1
    return mask


# ------------------------------------------------------------------- grouping search


@FAST
@given(st.one_of(ffn_case(), attn_case()))
def test_search_gives_valid_disjoint_blocks_with_exact_scores(case):
    scores, g, heads, fixed = case
    grouping = search_sublayer(scores, g, heads=heads, fixed_head_order=fixed, iters=4)
    for role, s in scores.items():
        n, h = s.shape
        assert sorted(grouping.inner_perm) == list(range(n))  # permutations
        assert sorted(grouping.outer_perms[role]) == list(range(h))
        mask = block_mask(grouping, role, s.shape)
        assert mask.max() <= 1 and mask.sum() == n * h // g  # disjoint, inside, 1/G kept
        assert np.isclose(grouping.block_scores[role].sum(), (s * mask).sum())
        for b in range(g):  # and block by block
            rows = grouping.inner_perm[b * n // g:(b + 1) * n // g]
            cols = grouping.outer_perms[role][b * h // g:(b + 1) * h // g]
            assert np.isclose(grouping.block_scores[role][b], s[np.ix_(rows, cols)].sum())
        assert np.isclose(grouping.totals[role], s.sum())
    assert 0.0 <= grouping.retained() <= 1.0 + 1e-12


@FAST
@given(st.one_of(ffn_case(), attn_case()))
def test_search_never_loses_to_contiguous_blocks(case):
    scores, g, heads, fixed = case
    kw = dict(heads=heads, fixed_head_order=fixed)
    searched = search_sublayer(scores, g, iters=4, **kw).retained()
    assert searched >= search_sublayer(scores, g, permute=False, **kw).retained() - 1e-12


@FAST
@given(attn_case())
def test_heads_stay_contiguous(case):
    scores, g, heads, fixed = case
    grouping = search_sublayer(scores, g, heads=heads, fixed_head_order=fixed, iters=4)
    hidden = len(grouping.inner_perm)
    head_size = hidden // heads
    slots = grouping.inner_perm.reshape(heads, head_size)
    if g <= heads and heads % g == 0 and not fixed:  # whole heads move between bands
        for slot in slots:  # each head slot holds one head's dims, in order
            assert len(set(slot // head_size)) == 1 and list(slot) == sorted(slot)
    else:  # bands split heads (or the order is fixed): every head keeps its own slot
        assert list(grouping.inner_perm // head_size) == list(np.arange(hidden) // head_size)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**31), st.booleans())
def test_balanced_assign_is_optimal_and_balanced(groups, capacity, seed, greedy):
    n = groups * capacity
    scores = np.random.default_rng(seed).random((n, groups))
    band = balanced_assign(scores, capacity, exact_up_to=0 if greedy else 512)
    assert np.bincount(band, minlength=groups).tolist() == [capacity] * groups
    value = scores[np.arange(n), band].sum()
    best = max(scores[np.arange(n), list(p)].sum()
               for p in set(itertools.permutations(np.repeat(np.arange(groups), capacity))))
    assert value <= best + 1e-12
    if not greedy:  # the Hungarian path is exact
        assert np.isclose(value, best)


# --------------------------------------------------------------------------- allocator


@st.composite
def model_case(draw):
    """Small dims, candidate groupings from the real search, a target and the drop flag."""
    heads, head_size = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([2, 3, 4, 6]))
    hidden = heads * head_size
    dims = Dims(layers=draw(st.integers(1, 2)), hidden=hidden, heads=heads,
                intermediate=hidden * draw(st.integers(1, 3)))
    max_groups = draw(st.sampled_from([1, 2, 4, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    power = draw(st.floats(1.0, 4.0))
    groupings = {}
    for layer in range(dims.layers):
        for kind, roles in SUBLAYERS.items():
            inner = hidden if kind == "attn" else dims.intermediate
            scale = rng.random() ** 3  # some sublayers matter much less than others
            scores = {r: rng.random((inner, hidden)) ** power * scale for r in roles}
            groupings[(layer, kind)] = {
                g: search_sublayer(scores, g, heads=heads if kind == "attn" else None, iters=2)
                for g in candidate_groups(kind, dims, max_groups)}
    sparsity = draw(st.floats(0.0, 0.95))
    return dims, groupings, sparsity, draw(st.booleans())


def total_weights(dims: Dims) -> int:
    return dims.layers * (4 * dims.hidden ** 2 + 2 * dims.hidden * dims.intermediate)


def reachable_kept(dims: Dims, groupings: dict, allow_drop: bool) -> np.ndarray:
    """Every kept-weight total some allocation reaches: per sublayer, any G among its
    candidates and any number of that G's equal-sized blocks (none only when dropping)."""
    reach = np.zeros(total_weights(dims) + 1, dtype=bool)
    reach[0] = True
    sizes = {"attn": dims.hidden ** 2, "ffn": dims.hidden * dims.intermediate}
    for (_, kind), by_g in groupings.items():
        options = {0} if allow_drop else set()
        for g in by_g:
            block, blocks = sizes[kind] // (g * g), len(SUBLAYERS[kind]) * g
            options |= {m * block for m in range(1, blocks + 1)}
        new = np.zeros_like(reach)
        for kept in options:
            new[kept:] |= reach[:len(reach) - kept]
        reach = new
    return reach


def feasible(dims: Dims, groupings: dict, sparsity: float, allow_drop: bool,
             tol: float = 0.005) -> bool:
    total = total_weights(dims)
    budget = (1.0 - sparsity) * total
    lo, hi = int(np.ceil(budget - tol * total)), int(np.floor(budget + tol * total))
    return bool(reachable_kept(dims, groupings, allow_drop)[max(lo, 0):hi + 1].any())


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def allocate_logged(dims, groupings, sparsity, allow_drop):
    """(recipe or the ValueError, warnings logged by the allocator)."""
    records = Records()
    logger = logging.getLogger("pgb.allocation")
    logger.addHandler(records)
    try:
        return allocate(groupings, dims, "bert", sparsity, allow_drop=allow_drop), \
            records.messages
    except ValueError as err:
        return err, records.messages
    finally:
        logger.removeHandler(records)


@FAST
@given(model_case())
def test_allocator_meets_the_budget_or_says_so(case):
    dims, groupings, sparsity, allow_drop = case
    recipe, warnings = allocate_logged(dims, groupings, sparsity, allow_drop)
    if isinstance(recipe, ValueError):  # refused: it names the target and what it reached
        assert f"cannot meet sparsity {sparsity:g}" in str(recipe)
        return
    recipe.validate()
    miss = abs(recipe.sparsity() - sparsity)
    assert miss <= 0.05
    if miss > 0.005:  # never silent
        assert any(f"removes {recipe.sparsity():.4f}" in w for w in warnings)
    if not allow_drop:
        assert recipe.dropped_sublayers() == []
    # the recipe's own count agrees with its masks
    kept = sum(float(p.mask(r).sum()) for p in recipe.sublayers for r in p.matrices)
    assert np.isclose(1.0 - kept / total_weights(dims), recipe.sparsity())


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(model_case())
def test_allocator_meets_the_budget_whenever_feasible(case):
    dims, groupings, sparsity, allow_drop = case
    if not feasible(dims, groupings, sparsity, allow_drop):
        return
    recipe, _ = allocate_logged(dims, groupings, sparsity, allow_drop)
    assert not isinstance(recipe, ValueError), recipe
    assert abs(recipe.sparsity() - sparsity) <= 0.005


def test_feasibility_oracle_on_a_known_case():
    # one layer, hidden 4, FFN 4, G in {1, 2}: 6 matrices of 16 weights, 96 in all. The
    # attention keeps 0, 4, ..., 32 (G=2: up to 8 blocks of 4), 48 or 64 (G=1) weights,
    # the FFN 0, 4, ..., 16 or 32: 84, 88 and 92 are out of reach
    dims = Dims(layers=1, hidden=4, heads=2, intermediate=4)
    groupings = {(0, k): {1: None, 2: None} for k in SUBLAYERS}
    reach = reachable_kept(dims, groupings, allow_drop=True)
    assert np.flatnonzero(reach).tolist() == [*range(0, 81, 4), 96]
    assert feasible(dims, groupings, 0.5, True) and not feasible(dims, groupings, 0.49, True)
    no_drop = reachable_kept(dims, groupings, allow_drop=False)
    assert np.flatnonzero(no_drop).min() == 4 + 4  # one 4-weight block per sublayer


# ------------------------------------------------------------------------------ recipe


@st.composite
def recipes(draw):
    heads, head_size = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    hidden = heads * head_size
    dims = Dims(layers=draw(st.integers(1, 3)), hidden=hidden, heads=heads,
                intermediate=hidden * draw(st.integers(1, 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    plans = []
    for layer in range(dims.layers):
        for kind, roles in SUBLAYERS.items():
            inner = hidden if kind == "attn" else dims.intermediate
            g = draw(st.sampled_from([d for d in range(1, hidden + 1)
                                      if hidden % d == 0 and inner % d == 0]))
            mats = {r: MatrixPlan(tuple(int(i) for i in rng.permutation(hidden)),
                                  tuple(sorted(int(b) for b in np.flatnonzero(
                                      rng.random(g) < 0.6))))
                    for r in roles}
            plans.append(SublayerPlan(layer, kind, g,
                                      tuple(int(i) for i in rng.permutation(inner)), mats))
    meta = draw(st.dictionaries(st.text(max_size=5),
                                st.one_of(st.integers(), st.text(max_size=5), st.booleans()),
                                max_size=3))
    return Recipe(draw(st.sampled_from(["bert", "roberta", "mpnet"])), dims, tuple(plans), meta)


@FAST
@given(recipes())
def test_recipe_json_round_trips(recipe):
    recipe.validate()
    text = json.dumps(recipe.to_json())
    again = Recipe.from_json(json.loads(text))
    assert again == recipe
    assert json.dumps(again.to_json()) == text
    assert again.sparsity() == recipe.sparsity()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.json"
        recipe.save(path)
        assert Recipe.load(path) == recipe
