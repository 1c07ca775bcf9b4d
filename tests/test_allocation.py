"""Allocator: budget met, importance-aware choices, drops, uniform ablation."""

import logging

import numpy as np
import pytest

from pgb.allocation import allocate, retained_importance
from pgb.arch import Dims
from pgb.grouping import candidate_groups, search_sublayer

DIMS = Dims(layers=3, hidden=24, heads=4, intermediate=48)


def groupings_for(rng, weak_layer=None):
    out = {}
    for layer in range(DIMS.layers):
        scale = 1e-6 if layer == weak_layer else 1.0
        for kind, roles, inner in (("attn", ("query", "key", "value", "attn_out"), 24),
                                   ("ffn", ("ffn_in", "ffn_out"), 48)):
            scores = {r: rng.random((inner, 24)) ** 3 * scale for r in roles}
            heads = DIMS.heads if kind == "attn" else None
            out[(layer, kind)] = {g: search_sublayer(scores, g, heads=heads)
                                  for g in candidate_groups(kind, DIMS)}
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.875])
def test_budget_is_met_within_half_a_point(sparsity):
    recipe = allocate(groupings_for(np.random.default_rng(0)), DIMS, "bert", sparsity)
    assert abs(recipe.sparsity() - sparsity) <= 0.005
    recipe.validate()


@pytest.mark.parametrize("objective", ["log", "linear"])
def test_unimportant_layer_is_pruned_first(objective):
    # layer 1 is a third of the weights: the budget is met inside it alone
    recipe = allocate(groupings_for(np.random.default_rng(1), weak_layer=1), DIMS, "bert", 0.333,
                      objective=objective)
    for p in recipe.sublayers:
        full = p.groups == 1 and all(len(m.kept) == 1 for m in p.matrices.values())
        assert full == (p.layer != 1), (p.layer, p.kind, p.groups)
    assert "1.ffn" in recipe.dropped_sublayers()


def test_no_drop_when_disallowed():
    recipe = allocate(groupings_for(np.random.default_rng(1), weak_layer=1), DIMS, "bert", 0.5,
                      allow_drop=False)
    assert all(p.groups > 1 for p in recipe.sublayers if p.layer == 1)


@pytest.mark.parametrize("objective", ["log", "linear"])
@pytest.mark.parametrize("uniform", [None, 1])
def test_exact_fallback_when_the_greedy_misses(objective, uniform, caplog):
    # hidden 3, FFN 6, G=1 only, no drops: 4 attention matrices of 9 weights, 2 FFN of 18,
    # 72 in all. The greedy alone reaches 0.625 (and refuses); keeping the 2 strongest
    # attention matrices and the stronger FFN matrix is exactly 0.5
    dims = Dims(layers=1, hidden=3, heads=1, intermediate=6)
    weight = {"query": 4.0, "key": 1.0, "value": 3.0, "attn_out": 2.0,
              "ffn_in": 5.0, "ffn_out": 6.0}
    groupings = {}
    for kind, roles, inner in (("attn", ("query", "key", "value", "attn_out"), 3),
                               ("ffn", ("ffn_in", "ffn_out"), 6)):
        scores = {r: np.full((inner, 3), weight[r]) for r in roles}
        groupings[(0, kind)] = {1: search_sublayer(scores, 1, heads=1 if kind == "attn" else None)}
    with caplog.at_level(logging.WARNING, logger="pgb.allocation"):
        recipe = allocate(groupings, dims, "bert", 0.5, uniform=uniform, allow_drop=False,
                          objective=objective)
    assert recipe.sparsity() == 0.5 and not caplog.records
    recipe.validate()
    kept = {r for p in recipe.sublayers for r, m in p.matrices.items() if m.kept}
    assert kept == {"query", "value", "ffn_out"}
    assert {p.groups for p in recipe.sublayers} == {1} and recipe.dropped_sublayers() == []


def test_uniform_groups_everywhere():
    recipe = allocate(groupings_for(np.random.default_rng(2)), DIMS, "bert", 0.75, uniform=4)
    assert {p.groups for p in recipe.sublayers} == {4}
    assert recipe.sparsity() == pytest.approx(0.75)
    assert recipe.dropped_sublayers() == []


def test_uniform_group_must_be_a_candidate():
    with pytest.raises(ValueError, match="uniform G 5"):
        allocate(groupings_for(np.random.default_rng(2)), DIMS, "bert", 0.8, uniform=5)


def test_sparsity_out_of_range():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.3"):
        allocate({}, DIMS, "bert", 1.3)


def test_retained_importance_rows():
    gr = groupings_for(np.random.default_rng(3))
    recipe = allocate(gr, DIMS, "bert", 0.5)
    rows = retained_importance(recipe, gr)
    assert len(rows) == DIMS.layers * 6
    assert all(0.0 <= r["retained_importance"] <= 1.0 + 1e-9 for r in rows)
    full = allocate(gr, DIMS, "bert", 0.0)
    assert all(r["retained_importance"] == pytest.approx(1.0)
               for r in retained_importance(full, gr))
