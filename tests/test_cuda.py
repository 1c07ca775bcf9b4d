"""The same model code on a CUDA device: compact models, their training, and compensation
from the teacher's trace give what they give on the CPU (skipped without a CUDA device)."""

import copy

import pytest
import torch
from test_compensate import ragged
from test_surgery import compacted, logits, make_recipe
from tiny import FAMILIES, tiny_batch, tiny_model

from pgb import trace as trace_mod
from pgb.compensate import apply_masks, compensate
from pgb.importance import importance_scores

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [(6, 13), (12, 30)])  # few tokens, and 360
def test_compact_model_on_cuda_matches_the_masked_dense_one_on_the_cpu(family, tokens):
    model = tiny_model(family)
    _recipe, masked, compact = compacted(model, 0.6)
    n, length = tokens
    batch = tiny_batch(n=n, length=length)
    ref = logits(masked, batch)
    out = logits(compact.to("cuda"), on(batch, "cuda"))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_compact_model_trains_on_cuda_as_on_the_cpu():
    model = tiny_model("bert")
    _recipe, _masked, compact = compacted(model, 0.6)
    after = {}
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(compact).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(3):
            net(**on(tiny_batch(seed=step), device)).loss.backward()
            opt.step()
            opt.zero_grad()
        after[device] = logits(net.eval(), on(tiny_batch(seed=9), device)).cpu()
    assert not torch.allclose(after["cpu"], logits(compact.eval(), tiny_batch(seed=9)),
                              atol=1e-3)  # the steps changed the model
    torch.testing.assert_close(after["cuda"], after["cpu"], atol=1e-4, rtol=1e-4)


def test_compensation_from_a_trace_on_cuda_gives_the_cpu_weights():
    """The trace is kept on the teacher's device, within that device's free memory."""
    teacher = tiny_model("bert").double()
    recipe = make_recipe(teacher, 0.6, weak=("1.attn",))
    batches = ragged()
    weights = {}
    for device in ("cpu", "cuda"):
        t = copy.deepcopy(teacher).to(device)
        trace = trace_mod.TeacherTrace(t)
        on_device = [on(b, device) for b in batches]
        importance_scores(t, on_device, "fisher", progress=False, trace=trace)
        assert all(len(layer) == 18 for layer in trace.store)
        assert all(v.device.type == device for layer in trace.store
                   for row in layer.values() for v in row.values())
        student = copy.deepcopy(t)
        apply_masks(student, recipe)
        compensate(student, t, recipe, on_device, progress=False, trace=trace)
        weights[device] = {k: v.cpu() for k, v in student.state_dict().items()}
    for name, w in weights["cpu"].items():
        torch.testing.assert_close(weights["cuda"][name], w, rtol=1e-9, atol=1e-10)
    _free, total = torch.cuda.mem_get_info()
    assert 0 < trace_mod.available_bytes(torch.device("cuda")) <= total
