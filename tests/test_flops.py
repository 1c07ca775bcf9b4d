"""FLOPs budgets: counted FLOPs of a plan equal the built model's; the sparsity solved for a
FLOPs ratio meets it; bad FLOPs budgets are refused."""

import copy

import pytest
import torch
from test_surgery import make_recipe
from tiny import FAMILIES, tiny_model

from pgb.arch import dims_of
from pgb.config import CompressConfig
from pgb.flops import (
    counted_flops,
    dense_flops,
    flops,
    plan_flops_ratio,
    sparsity_for_flops,
)
from pgb.structured import Structure, select, shrink
from pgb.surgery import to_compact


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_recipe_counts_equal_the_compact_model(family, sparsity):
    model = tiny_model(family)
    d = dims_of(model)
    assert flops(model, 37) == dense_flops(d, 37)
    recipe = make_recipe(model, sparsity, weak=("1.attn",))  # 1.attn is dropped at 0.8
    compact = to_compact(copy.deepcopy(model), recipe)
    assert counted_flops(37, *recipe.flops_counts()) == flops(compact, 37)
    assert plan_flops_ratio(recipe) == pytest.approx(flops(compact, 128) / flops(model, 128))


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_structure_counts_equal_the_shrunk_model(family):
    model = tiny_model(family)
    d = dims_of(model)
    for s in (Structure(family, d, heads=((), (1, 3)), neurons=(tuple(range(7)), ())),
              select(torch.rand(d.layers, d.heads) ** 3, torch.rand(d.layers, d.intermediate),
                     d, 0.6, family)):
        small = shrink(copy.deepcopy(model), s)
        assert counted_flops(29, *s.flops_counts()) == flops(small, 29)


def test_sparsity_for_flops_known_answers():
    # FLOPs falling linearly from 1 at sparsity 0 to 0.1 at sparsity 1
    def ratio(s):
        return 1.0 - 0.9 * s

    s = sparsity_for_flops(ratio, 0.55)
    assert ratio(s) <= 0.55 and s == pytest.approx(0.5, abs=2e-4)
    assert sparsity_for_flops(ratio, 1.0) == 0.0  # the teacher meets it already
    with pytest.raises(ValueError, match=r"FLOPs ratio 0.05 is out of reach.*leaves "
                                         r"0.1045.*ask for 0.105 or more"):
        sparsity_for_flops(ratio, 0.05)
    # a plan that cannot be made at a sparsity counts as too costly there
    assert sparsity_for_flops(lambda s: float("inf") if s < 0.3 else ratio(s), 0.9) \
        == pytest.approx(0.3, abs=2e-4)


@pytest.mark.parametrize("cfg,message", [
    ({"flops_ratio": 0.0}, r"flops_ratio must be in \(0, 1\], got 0.0"),
    ({"flops_ratio": 1.5}, r"flops_ratio must be in \(0, 1\], got 1.5"),
    ({"flops_ratio": 0.5, "method": "magnitude"}, "magnitude pruning keeps dense shapes"),
    ({"flops_ratio": 0.5, "uniform_groups": True}, "--uniform-groups fixes G"),
])
def test_bad_flops_budget_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(**cfg)
