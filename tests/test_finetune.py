"""A training step run as length-sorted pieces has the loss and gradient of the whole batch
(task loss, logit and hidden-state distillation, a teacher-output cache); QA runs whole."""

from __future__ import annotations

import pytest
import torch
from test_importance import LENGTHS, ragged_batch
from tiny import tiny_model

from pgb import pieces as pieces_mod
from pgb.config import TrainConfig
from pgb.finetune import _step
from pgb.teacher_cache import TeacherOutputs


def step(model, teacher, batch, cfg, monkeypatch, pass_tokens: int):
    """(loss, gradients, forward passes of the student) of one step at ``PASS_TOKENS``."""
    monkeypatch.setattr(pieces_mod, "PASS_TOKENS", pass_tokens)
    model.train().zero_grad(set_to_none=True)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        loss = _step(model, teacher, batch, cfg, "cpu")
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, len(calls)


@pytest.mark.parametrize("family,labels,teacher_kind", [
    ("bert", "class", None), ("roberta", "regression", "module"),
    ("distilbert", "class", "cache"), ("mpnet", "class", "hidden"),
    ("electra", "class", "no-keep"), ("bert", "qa", "module")])
def test_a_step_in_pieces_equals_the_whole_batch(family, labels, teacher_kind, monkeypatch):
    num_labels = {"class": 3, "regression": 1, "qa": 2}[labels]
    model = tiny_model(family, num_labels=num_labels, qa=labels == "qa")
    teacher = None
    if teacher_kind is not None:
        teacher = tiny_model(family, num_labels=num_labels, seed=1, qa=labels == "qa")
        if teacher_kind in ("cache", "no-keep"):
            teacher = TeacherOutputs(teacher, keep=teacher_kind == "cache")
    cfg = TrainConfig(max_steps=1, kd_alpha=0.7 if teacher else 0.0,
                      kd_hidden=1.5 if teacher_kind == "hidden" else 0.0)
    batch = ragged_batch(labels, seed=3)
    loss_whole, whole, passes_whole = step(model, teacher, batch, cfg, monkeypatch, 10**9)
    loss_cut, cut, passes_cut = step(model, teacher, batch, cfg, monkeypatch, 0)
    assert passes_whole == 1
    # a piece per distinct length; the span softmax (QA) covers padded positions: run whole
    assert passes_cut == (1 if labels == "qa" else len(set(LENGTHS)))
    assert loss_cut == pytest.approx(loss_whole, rel=1e-5)
    assert whole.keys() == cut.keys() and len(whole) > 0
    scale = max(float(g.abs().max()) for g in whole.values())
    for name, g in whole.items():
        # float32 sums in another order: entries far below the largest move by ~1e-8
        torch.testing.assert_close(cut[name], g, rtol=1e-4, atol=1e-6 * scale)
    if teacher_kind == "cache":  # kept per piece: the whole batch, then each piece
        assert (teacher.misses, teacher.hits) == (1 + passes_cut, 0)
        step(model, teacher, batch, cfg, monkeypatch, 0)
        assert (teacher.misses, teacher.hits) == (1 + passes_cut, passes_cut)
