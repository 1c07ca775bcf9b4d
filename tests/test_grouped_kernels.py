"""The grouped kernels as a custom op: a valid op, and what torch.compile graphs call."""

from __future__ import annotations

import pytest
import torch
from test_grouped_linear import CASES, _make
from test_surgery import compacted, logits
from tiny import tiny_batch, tiny_model

from pgb.grouped_kernels import BlockLayout


@pytest.mark.parametrize("case", [c for c in CASES if c[3]])  # the op needs a kept block
@pytest.mark.parametrize("strategy", ["auto", "bands", "batched", "conv", "native"])
def test_grouped_mm_is_a_valid_op_that_matches_the_layer(case, strategy):
    in_f, out_f, groups, kept = case
    module = _make(*case, gather=False, scatter=False)
    xb = torch.randn(9, in_f)
    weight, bias = module.weight.detach(), module.bias.detach()
    out = torch.ops.pgb.grouped_mm(xb, weight, bias, groups, kept, strategy)
    with torch.no_grad():
        torch.testing.assert_close(out, module(xb), atol=1e-5, rtol=1e-5)
    # schema, fake (meta) implementation and real one agree
    torch.library.opcheck(torch.ops.pgb.grouped_mm, (xb, weight, bias, groups, kept, strategy),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pgb.grouped_mm, (xb, weight, None, groups, kept, strategy),
                          test_utils=("test_schema", "test_faketensor"))


def test_layout_runs_match_the_layer():
    module = _make(35, 21, 7, [1, 2, 4, 6], gather=False, scatter=False)
    layout = BlockLayout(35, 21, 7, (1, 2, 4, 6))
    for name in ("ib", "ob", "_kept", "_kept_runs", "_dropped_runs", "_all_kept"):
        assert getattr(layout, name) == getattr(module, name), name
    assert layout._kept_runs == [(0, 1, 3), (2, 4, 5), (3, 6, 7)]
    assert layout._dropped_runs == [(0, 1), (3, 4), (5, 6)]


class GraphRecorder:
    """A torch.compile backend that keeps the FX graphs it is handed, then runs them
    through aot_eager (fake-tensor tracing, no C++ compiler needed)."""

    def __init__(self):
        self.targets: list[str] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    def calls_op(self) -> bool:
        return any("grouped_mm" in t for t in self.targets)


@pytest.mark.parametrize("gather", [False, True])
def test_compiled_layer_calls_the_op_in_inference_and_the_reference_when_training(gather):
    torch._dynamo.reset()
    module = _make(12, 18, 3, [0, 2], gather=gather, scatter=True)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = module(x)
    recorder = GraphRecorder()
    compiled = torch.compile(module, backend=recorder, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert recorder.calls_op()

    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(module, backend=recorder, fullgraph=True)
    out = compiled(x)  # parameters need gradients: the differentiable path
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not recorder.calls_op()
    out.sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_compiled_compact_model_equals_eager_and_calls_the_op():
    torch._dynamo.reset()
    _, _, compact = compacted(tiny_model("bert"), 0.5)
    recorder = GraphRecorder()
    compiled = torch.compile(compact.eval(), backend=recorder)
    # a second shape recompiles with dynamic sizes: the op's fake takes symbolic tokens
    for n, length in ((3, 11), (2, 7), (4, 5)):
        batch = tiny_batch(n=n, length=length, labels=None)
        with torch.inference_mode():
            out = compiled(**batch).logits
        torch.testing.assert_close(out, logits(compact, batch), atol=1e-5, rtol=1e-5)
    assert recorder.calls_op()
