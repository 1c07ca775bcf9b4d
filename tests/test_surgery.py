"""Surgery equivalences: compact == masked dense; permute-only is exact; densify; drops."""

import copy
import dataclasses

import pytest
import torch
from tiny import FAMILIES, random_scores, tiny_batch, tiny_model

from pgb.allocation import allocate
from pgb.arch import dims_of, get_matrix
from pgb.compensate import apply_masks
from pgb.config import CompressConfig
from pgb.grouped_linear import GroupedLinear
from pgb.pipeline import search_groupings
from pgb.recipe import MatrixPlan, Recipe, SublayerPlan
from pgb.surgery import (
    ConstantOutput,
    DroppedAttention,
    count_gathers,
    densify,
    hidden_state_orders,
    to_compact,
)


def make_recipe(model, sparsity, weak=(), seed=0, **cfg):
    scores = random_scores(model, seed=seed, weak=weak)
    groupings = search_groupings(scores, model, CompressConfig(sparsity=sparsity, **cfg),
                                 progress=False)
    recipe = allocate(groupings, dims_of(model), model.config.model_type, sparsity)
    if cfg.get("shared_order"):  # as pgb.pipeline.compress marks it
        recipe = dataclasses.replace(recipe, meta={"shared_order": True})
        recipe.validate()
    return recipe


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def compacted(model, sparsity, **cfg):
    """(recipe, masked dense model, its compact form) for ``model`` at ``sparsity``."""
    recipe = make_recipe(model, sparsity, weak=("1.attn",), **cfg)
    masked = copy.deepcopy(model)
    apply_masks(masked, recipe)
    return recipe, masked, to_compact(copy.deepcopy(masked), recipe)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
@pytest.mark.parametrize("shared_order", [False, True])
def test_compact_equals_masked_dense(family, sparsity, shared_order):
    model = tiny_model(family)
    recipe, masked, compact = compacted(model, sparsity, shared_order=shared_order)
    batch = tiny_batch()
    ref = logits(masked, batch)
    torch.testing.assert_close(logits(compact, batch), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(densify(compact), batch), ref, atol=1e-5, rtol=1e-5)
    # the weights outside kept blocks play no part: the unmasked original compacts the same
    torch.testing.assert_close(logits(to_compact(copy.deepcopy(model), recipe), batch), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared_order", [False, True])
def test_compact_equals_masked_dense_with_many_tokens(family, shared_order, no_native):
    """360 tokens: the PyTorch kernels for large inputs ("conv" where every block is
    kept, "bands" elsewhere) instead of the few-token "batched" one."""
    model = tiny_model(family)
    _, masked, compact = compacted(model, 0.5, shared_order=shared_order)
    batch = tiny_batch(n=6, length=60)
    tokens = torch.zeros(6 * 60, 1)
    with torch.no_grad():
        picked = {m.pick_strategy(tokens.expand(-1, m.in_features))
                  for m in compact.modules() if isinstance(m, GroupedLinear)}
    assert picked & {"conv", "bands"}, picked
    torch.testing.assert_close(logits(compact, batch), logits(masked, batch),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_order_leaves_few_gathers(family):
    model = tiny_model(family)
    _, _, compact = compacted(model, 0.8, shared_order=True)
    # no grouped layer gathers or scatters; at most one order change per sublayer + 1
    assert all(m.in_index is None and m.out_index is None for m in compact.modules()
               if isinstance(m, GroupedLinear))
    assert 0 < count_gathers(compact) <= 2 * dims_of(model).layers + 1
    assert count_gathers(compacted(model, 0.8)[2]) > count_gathers(compact)


@pytest.mark.parametrize("family", ["bert", "electra", "distilbert"])
def test_shared_order_hidden_states_map_back_to_the_masked_dense_ones(family):
    _, masked, compact = compacted(tiny_model(family), 0.6, shared_order=True)
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    with torch.no_grad():
        ours = compact(**batch, output_hidden_states=True).hidden_states
        ref = masked(**batch, output_hidden_states=True).hidden_states
    orders = hidden_state_orders(compact)
    assert len(orders) == len(ref) and orders[-1] is None
    assert any(o is not None for o in orders)  # the stream really runs permuted
    for h, r, order in zip(ours, ref, orders, strict=True):
        torch.testing.assert_close(h, r if order is None else r[..., order],
                                   atol=1e-5, rtol=1e-5)


def test_hidden_distillation_loss_is_the_same_for_a_shared_order_compact_model():
    from pgb.config import TrainConfig
    from pgb.finetune import _step

    teacher = tiny_model("bert")
    _, masked, compact = compacted(teacher, 0.6, shared_order=True)
    cfg = TrainConfig(kd_hidden=1.0)
    losses = [_step(m.eval(), teacher, tiny_batch(), cfg, "cpu", backward=False)
              for m in (compact, masked)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1] > 0


def test_a_shared_order_recipe_needs_one_outer_order_per_sublayer():
    model = tiny_model("bert")
    recipe = make_recipe(model, 0.5)  # per-matrix orders
    with pytest.raises(ValueError, match="shared_order"):
        dataclasses.replace(recipe, meta={"shared_order": True}).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_permute_only_surgery_leaves_logits_unchanged(family):
    model = tiny_model(family)
    d = dims_of(model)
    g = torch.Generator().manual_seed(1)
    plans = []
    for layer in range(d.layers):
        heads = torch.randperm(d.heads, generator=g)
        if family == "mpnet":  # per-head position bias pins the head order
            heads = torch.arange(d.heads)
        hs = d.hidden // d.heads
        attn = torch.cat([h * hs + torch.randperm(hs, generator=g) for h in heads])
        ffn = torch.randperm(d.intermediate, generator=g)
        for kind, inner, roles in (("attn", attn, ("query", "key", "value", "attn_out")),
                                   ("ffn", ffn, ("ffn_in", "ffn_out"))):
            mats = {r: MatrixPlan(tuple(torch.randperm(d.hidden, generator=g).tolist()), (0,))
                    for r in roles}
            plans.append(SublayerPlan(layer, kind, 1, tuple(inner.tolist()), mats))
    recipe = Recipe(model.config.model_type, d, tuple(plans))
    recipe.validate()
    compact = to_compact(copy.deepcopy(model), recipe)
    assert isinstance(get_matrix(compact, 0, "query"), GroupedLinear)
    batch = tiny_batch()
    assert torch.allclose(logits(compact, batch), logits(model, batch), atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_dropped_sublayers_equal_their_bias_only_branch(family):
    model = tiny_model(family)
    recipe = make_recipe(model, 0.555, weak=("0.attn", "1.ffn"))  # a target the drops meet
    assert {"0.attn", "1.ffn"} <= set(recipe.dropped_sublayers())
    compact = to_compact(copy.deepcopy(model), recipe)
    spec_core = {"bert": "attention.self", "distilbert": "attention",
                 "mpnet": "attention.attn"}[family]
    layer0 = compact.base_model.get_submodule(
        {"distilbert": "transformer.layer.0"}.get(family, "encoder.layer.0"))
    assert isinstance(layer0.get_submodule(spec_core), DroppedAttention)
    # reference: the original model with the attention branch of layer 0 replaced by the
    # output bias, and the FFN branch of layer 1 by its output bias
    ref = copy.deepcopy(model)
    apply_masks(ref, recipe)
    assert torch.allclose(logits(compact, tiny_batch()), logits(ref, tiny_batch()), atol=1e-5)
    out = get_matrix(compact, 1, "ffn_out")
    assert isinstance(out, ConstantOutput)
    assert torch.equal(out.bias, get_matrix(model, 1, "ffn_out").bias)


def test_compact_is_physically_smaller():
    model = tiny_model("bert")
    recipe = make_recipe(model, 0.75)
    compact = to_compact(copy.deepcopy(model), recipe)
    kept = sum(get_matrix(compact, p.layer, r).weight.numel()
               for p in recipe.sublayers if not p.dropped for r in p.matrices
               if hasattr(get_matrix(compact, p.layer, r), "weight"))
    d = dims_of(model)
    total = d.layers * (4 * d.hidden ** 2 + 2 * d.hidden * d.intermediate)
    assert kept == pytest.approx(total * (1 - recipe.sparsity()))


def test_compact_trains_and_keeps_structure():
    model = tiny_model("bert")
    recipe = make_recipe(model, 0.6)
    compact = to_compact(copy.deepcopy(model), recipe).train()
    opt = torch.optim.SGD(compact.parameters(), lr=0.1)
    loss = compact(**tiny_batch()).loss
    loss.backward()
    opt.step()
    dense = densify(compact.eval())
    for p in recipe.sublayers:
        for role in p.matrices:  # zeros stay zeros: the structure is frozen by construction
            w = get_matrix(dense, p.layer, role).weight
            assert torch.all(w[p.mask(role) == 0] == 0)


def test_densify_needs_a_compact_model():
    with pytest.raises(ValueError, match="compact pgb model"):
        densify(tiny_model("bert"))


@pytest.mark.parametrize("shared_order", [False, True])
def test_training_the_compact_model_equals_training_the_masked_dense_one(shared_order):
    """Re-finetuning runs on the compact model; it must follow, step by step, the masked
    dense model trained with its pruned weights held at zero (same AdamW, weight decay,
    dropout masks and clipping as pgb's own re-finetuning)."""
    from pgb.config import TrainConfig
    from pgb.finetune import _optimizer, _update

    model = tiny_model("bert")
    recipe, masked, compact = compacted(model, 0.6, shared_order=shared_order)
    masks = {get_matrix(masked, p.layer, r).weight: p.mask(r) for p in recipe.sublayers
             if not p.dropped for r in p.matrices}
    cfg = TrainConfig(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)
    runs = {}
    for name, net in (("compact", compact), ("masked", masked)):
        opt = _optimizer(net, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
        net.train()
        torch.manual_seed(3)  # the same dropout masks in both runs
        for step in range(4):
            net(**tiny_batch(seed=step)).loss.backward()
            for w, m in masks.items():
                if w.grad is not None and name == "masked":
                    w.grad.mul_(m.to(w.grad))
            _update(net, opt, sched, cfg)
        runs[name] = logits(net.eval(), tiny_batch(seed=9))
    # the dropped attention of layer 1 keeps training its bias only in both
    assert not torch.allclose(runs["compact"], logits(compact_start(model, recipe),
                                                      tiny_batch(seed=9)), atol=1e-3)
    torch.testing.assert_close(runs["compact"], runs["masked"], atol=1e-4, rtol=1e-4)


def compact_start(model, recipe):
    masked = copy.deepcopy(model)
    apply_masks(masked, recipe)
    return to_compact(masked, recipe).eval()
