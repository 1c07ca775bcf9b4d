"""Native dropout (pgb.dropout): the mask's statistics, its recomputation in the backward
pass, and a model under ``fast_dropout`` equal to the model without it where no value is
dropped, for every supported family."""

from __future__ import annotations

import pytest
import torch
from test_native import needs_native
from tiny import FAMILIES, tiny_batch, tiny_model

from pgb import dropout, native
from pgb.dropout import ATTENTION, apply_dropout, attention, fast_dropout

pytestmark = needs_native


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_rate_scale_and_independence(p):
    x = torch.randn(1_000_003)
    y = native.dropout_mask_apply(x, p, seed=12345)
    kept = y != 0
    # binomial: 5 standard deviations of the kept fraction at n = 1e6 is under 0.0025
    assert abs(kept.float().mean().item() - (1 - p)) < 0.0025
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=1e-6, atol=0)
    assert torch.equal(y, native.dropout_mask_apply(x, p, seed=12345))
    other = native.dropout_mask_apply(x, p, seed=12346) != 0
    assert abs((kept & other).float().mean().item() - (1 - p) ** 2) < 0.0025
    # neighbouring positions are not correlated
    pairs = (kept[:-1] & kept[1:]).float().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 0.0025


def test_vector_and_scalar_paths_draw_the_same_mask():
    """Sizes 16 and 15 put positions 8..14 in the 8-wide loop once and in the scalar tail
    once: the mask is a function of (seed, position) only."""
    x = torch.randn(16) + 3.0  # no zeros
    long = native.dropout_mask_apply(x, 0.5, seed=2 ** 40 + 7)
    short = native.dropout_mask_apply(x[:15].clone(), 0.5, seed=2 ** 40 + 7)
    assert torch.equal(long[:15], short)
    big = torch.randn(200_000) + 3.0  # the threaded path against a short scalar-only call
    assert torch.equal(native.dropout_mask_apply(big, 0.3, seed=5)[:7],
                       native.dropout_mask_apply(big[:7].clone(), 0.3, seed=5))


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="contiguous float32 CPU"):
        native.dropout_mask_apply(torch.randn(4, 4).t(), 0.1, 1)
    with pytest.raises(TypeError, match="contiguous float32 CPU"):
        native.dropout_mask_apply(torch.randn(8, dtype=torch.float64), 0.1, 1)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        native.dropout_mask_apply(torch.randn(8), 1.0, 1)


def test_backward_applies_the_forward_mask():
    torch.manual_seed(0)
    x = (torch.randn(37, 41) + 5.0).requires_grad_()
    y = apply_dropout(x, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.75, torch.zeros_like(g)),
                               rtol=1e-6, atol=0)


def test_masks_follow_torch_manual_seed_and_fall_back_elsewhere():
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = apply_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, apply_dropout(x, 0.2))
    assert not torch.equal(a, apply_dropout(x, 0.2))  # the next call draws a new seed
    assert apply_dropout(x, 0.2, training=False) is x
    double = apply_dropout(x.double(), 0.5)  # torch's own dropout: same contract
    assert double.dtype == torch.float64
    assert set(torch.unique(double / x.double()).tolist()) <= {0.0, 2.0}


def _set_dropout(model, p: float) -> None:
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                "attention_dropout", "seq_classif_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_dropout_keeping_everything_is_the_model_itself(family):
    """With a rate so small that no value is dropped (threshold 0, scale 1.0 in float32),
    training under fast_dropout gives the eval-mode logits and gradients: the attention
    replacement and the module patches compute what transformers computes."""
    model = tiny_model(family)
    _set_dropout(model, 1e-12)
    batch = tiny_batch()
    attn = model.config._attn_implementation
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.train()
    with fast_dropout(model):
        if attn == "sdpa":
            assert model.config._attn_implementation == ATTENTION
        out = model(**batch)
        out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                   rtol=1e-4, atol=1e-5, msg=name)
    assert model.config._attn_implementation == attn
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_dropout_drops_reproducibly_and_eval_is_untouched(family, monkeypatch):
    model = tiny_model(family)
    _set_dropout(model, 0.3)
    batch = tiny_batch()
    evaluated = model(**batch).logits
    shapes = []
    native_apply = dropout.apply_dropout
    monkeypatch.setattr(dropout, "apply_dropout",
                        lambda x, p, training=True: shapes.append(x.dim()) or
                        native_apply(x, p, training))
    model.train()
    with fast_dropout(model):
        torch.manual_seed(11)
        a = model(**batch).logits
        torch.manual_seed(11)
        b = model(**batch)
        b.loss.backward()
        model.eval()
        inside_eval = model(**batch).logits
    assert torch.equal(a, b.logits)
    assert {2, 3, 4} <= set(shapes)  # head, hidden states and attention probabilities
    assert not torch.allclose(a, evaluated, atol=1e-3)  # dropout is on in training
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(inside_eval, evaluated, rtol=1e-5, atol=1e-6)


def test_attention_falls_back_to_sdpa_where_it_does_not_apply():
    """Causal modules, grouped key/value heads and eval mode go to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    module.train()
    out, _ = attention(module, q, k, v, None, dropout=0.0)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0)
    assert torch.equal(out, ref)
    torch.manual_seed(1)
    dropped, _ = attention(module, q, k, v, None, dropout=0.5)  # causal: torch's dropout
    torch.manual_seed(1)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.5)
    assert torch.equal(dropped, ref)


@pytest.mark.parametrize("additive", [False, True])
def test_a_padding_mask_hides_padded_keys(additive):
    """Boolean masks (True: attend) and additive float masks (large negative: hidden)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False
    given = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) \
        if additive else mask
    module = torch.nn.Module()
    module.train()
    out, _ = attention(module, q, k, v, given, dropout=1e-12)
    changed = v.clone()
    changed[0, :, 4:] = 100.0  # values of padded keys must not reach any output
    again, _ = attention(module, q, k, changed, given, dropout=1e-12)
    assert torch.equal(out, again)
    scores = (q @ k.transpose(2, 3)) / 8 ** 0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
