"""GroupedLinear: every kernel path equals the masked dense layer it stands for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgb.grouped_linear import STRATEGIES, GroupedLinear, _runs

# (in, out, groups, kept): odd sizes, partial and empty kept sets
CASES = [
    (12, 18, 3, [0, 1, 2]),
    (12, 18, 3, [0, 2]),
    (74, 37 * 4, 2, [1]),
    (35, 21, 7, [1, 2, 4, 6]),
    (8, 8, 4, []),
    (45, 72, 3, [0, 2]),  # blocks 24 wide: the native kernel's 16- and 8-wide tiles
]


def _make(in_f, out_f, groups, kept, gather, scatter, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    in_index = torch.randperm(in_f, generator=g) if gather else None
    out_index = torch.randperm(out_f, generator=g) if scatter else None
    torch.manual_seed(seed)
    return GroupedLinear(in_f, out_f, groups, kept, in_index, out_index, **kw)


def _run(module, x, strategy):
    """Forward with a forced kernel; the fast kernels need no autograd graph."""
    module.strategy = strategy
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_every_strategy_matches_to_dense(case, gather, scatter):
    module = _make(*case, gather, scatter)
    x = torch.randn(3, 5, case[0])  # (B, T, in)
    w, b = module.to_dense()
    expected = x @ w.T + b
    for strategy in STRATEGIES:
        torch.testing.assert_close(_run(module, x, strategy), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)  # grad path


def test_strided_and_1d_inputs():
    module = _make(12, 18, 3, [0, 2], gather=False, scatter=True)
    w, b = module.to_dense()
    x_t = torch.randn(12, 7).t()  # (7, 12), last-dim stride 7
    x_1d = torch.randn(12)
    for strategy in STRATEGIES:
        torch.testing.assert_close(_run(module, x_t, strategy), x_t @ w.T + b)
        torch.testing.assert_close(_run(module, x_1d, strategy), x_1d @ w.T + b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_bias(strategy):
    module = _make(12, 18, 3, [0, 2], gather=True, scatter=True, bias=False)
    x = torch.randn(4, 12)
    w, b = module.to_dense()
    assert module.bias is None and torch.count_nonzero(b) == 0
    torch.testing.assert_close(_run(module, x, strategy), x @ w.T, atol=1e-5, rtol=1e-5)


def test_auto_picks_by_tokens_and_shape(no_native):
    """The PyTorch kernels' rule (the native kernel, where built, goes first at few tokens:
    ``test_native.py``)."""
    wide = GroupedLinear(8, 32, 4, [0, 1, 2, 3])
    narrow = GroupedLinear(32, 8, 4, [0, 1, 2, 3])
    holed = GroupedLinear(8, 32, 4, [0, 2, 3])
    many = "conv" if torch.backends.mkldnn.is_available() else "bands"
    with torch.no_grad():
        assert wide.pick_strategy(torch.zeros(128, 8)) == "batched"  # few tokens
        assert wide.pick_strategy(torch.zeros(4096, 8)) == many
        assert narrow.pick_strategy(torch.zeros(512, 32)) == "batched"  # narrow output
        assert narrow.pick_strategy(torch.zeros(4096, 32)) == many
        assert holed.pick_strategy(torch.zeros(4096, 8)) == "bands"  # a dropped block
        holed.strategy = "conv"
        assert holed.pick_strategy(torch.zeros(4096, 8)) == "bands"
        with torch.backends.mkldnn.flags(enabled=False):
            assert wide.pick_strategy(torch.zeros(4096, 8)) == "bands"
    assert wide.pick_strategy(torch.zeros(4096, 8)) == "reference"  # params need grad


def test_conv_writes_no_copy_of_the_output():
    """The convolution's channels-last result is handed back as an (N, out) view."""
    module = GroupedLinear(12, 18, 3, [0, 1, 2]).requires_grad_(False)
    module.strategy = "conv"
    x = torch.randn(50, 12)
    with torch.no_grad():
        y = module(x)
        w, b = module.to_dense()
    assert y.is_contiguous() and y.shape == (50, 18)
    torch.testing.assert_close(y, x @ w.T + b, atol=1e-5, rtol=1e-5)


def test_runs_of_consecutive_block_ids():
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert _runs([]) == []


def test_from_dense_known_mask():
    # 4x4, G=2: block 0 = rows {2, 0} x cols {1, 3}, block 1 = rows {3, 1} x cols {0, 2}
    weight = torch.arange(1.0, 17.0).reshape(4, 4)
    bias = torch.tensor([10.0, 20.0, 30.0, 40.0])
    row_perm, col_perm = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])
    mask_block1 = torch.tensor([[0, 0, 0, 0],
                                [1, 0, 1, 0],
                                [0, 0, 0, 0],
                                [1, 0, 1, 0]], dtype=torch.bool)
    module = GroupedLinear.from_dense(weight, bias, 2, [1], row_perm, col_perm,
                                      gather_input=True, scatter_output=True)
    w, b = module.to_dense()
    torch.testing.assert_close(w, weight * mask_block1)
    torch.testing.assert_close(b, bias)
    # the kept block as stored (ib, ob): cols (0, 2) x rows (3, 1) of the dense weight
    torch.testing.assert_close(module.weight[0], torch.tensor([[13.0, 5.0], [15.0, 7.0]]))
    x = torch.randn(6, 4)
    torch.testing.assert_close(module(x), x @ (weight * mask_block1).T + bias)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_from_dense_random_matches_masked_dense(gather, scatter):
    g = torch.Generator().manual_seed(1)
    out_f, in_f, groups = 24, 36, 6
    ib, ob = in_f // groups, out_f // groups
    weight, bias = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    rows, cols = torch.randperm(out_f, generator=g), torch.randperm(in_f, generator=g)
    kept = [0, 3, 4]
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for k in kept:  # the mask built by hand, in original index order
        for r in rows[k * ob:(k + 1) * ob]:
            mask[r, cols[k * ib:(k + 1) * ib]] = True
    module = GroupedLinear.from_dense(weight, bias, groups, kept, rows, cols, gather, scatter)
    x = torch.randn(7, in_f, generator=g)
    expected = x @ (weight * mask).T + bias  # (7, out) original order
    x_in = x if gather else x[:, cols]  # caller pre-permutes when the module does not gather
    if not scatter:
        expected = expected[:, rows]  # outputs come in row_perm order
    for strategy in STRATEGIES:
        torch.testing.assert_close(_run(module, x_in, strategy), expected, atol=1e-5, rtol=1e-5)


def test_empty_kept_gives_bias():
    module = _make(8, 12, 4, [], gather=True, scatter=True)
    x = torch.randn(2, 3, 8)
    expected = torch.empty(12)
    expected[module.out_index] = module.bias.detach()  # y[..., out_index] = bias
    for strategy in STRATEGIES:
        y = _run(module, x, strategy)
        torch.testing.assert_close(y, expected.expand(2, 3, 12))
        assert y.data_ptr() != module.bias.data_ptr()  # a fresh tensor, never the parameter


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_gradients_match_masked_linear(gather, scatter):
    module = _make(12, 18, 3, [0, 2], gather, scatter)
    w, b = module.to_dense()
    mask = (w != 0).float()
    dense = nn.Linear(12, 18)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(b)
    x1 = torch.randn(4, 5, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    target = torch.randn(4, 5, 18)
    ((module(x1) - target) ** 2).sum().backward()
    ((dense(x2) - target) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    # weight grads: put the block grads back through the same dense mapping
    grad_module = GroupedLinear(12, 18, 3, [0, 2], module.in_index, module.out_index)
    with torch.no_grad():
        grad_module.weight.copy_(module.weight.grad)
        grad_module.bias.copy_(module.bias.grad)
    gw, gb = grad_module.to_dense()
    torch.testing.assert_close(gw, dense.weight.grad * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, dense.bias.grad, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip(tmp_path):
    args = (12, 18, 3, [0, 2])
    module = _make(*args, gather=True, scatter=True, seed=3)
    assert {"weight", "bias", "kept", "in_index", "out_index"} <= set(module.state_dict())
    torch.save(module.state_dict(), tmp_path / "gl.pt")
    fresh = _make(*args, gather=True, scatter=True, seed=4)  # other perms and weights
    fresh.load_state_dict(torch.load(tmp_path / "gl.pt"))
    x = torch.randn(5, 12)
    for strategy in STRATEGIES:
        torch.testing.assert_close(_run(fresh, x, strategy), _run(module, x, strategy))


def test_bad_state_dict_kept_is_rejected():
    module = GroupedLinear(12, 18, 3, [0, 2])
    state = module.state_dict()
    state["kept"] = torch.tensor([2, 0])
    with pytest.raises(ValueError, match=r"sorted and distinct, got \[2, 0\]"):
        GroupedLinear(12, 18, 3, [0, 2]).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": 5}, "groups=5 must divide in_features=12"),
        ({"groups": 4, "out_features": 18}, "groups=4 must divide out_features=18"),
        ({"kept": [0, 3]}, "kept block id 3 is out of range"),
        ({"kept": [1, 1]}, r"sorted and distinct, got \[1, 1\]"),
        ({"kept": [2, 1]}, r"sorted and distinct, got \[2, 1\]"),
        ({"in_index": torch.tensor([0] * 12)}, "in_index must be a permutation of 0..11"),
        ({"in_index": torch.arange(11)}, "in_index must be a 1-D permutation of length 12"),
        ({"out_index": torch.arange(24) + 1}, "out_index must be a permutation of 0..23"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = {"in_features": 12, "out_features": 24, "groups": 3, "kept": [0]} | kwargs
    with pytest.raises(ValueError, match=message):
        GroupedLinear(**args)


def test_bad_strategy_raises():
    module = GroupedLinear(12, 18, 3, [0])
    module.strategy = "fast"
    with pytest.raises(ValueError, match="strategy must be one of .* got 'fast'"):
        module(torch.randn(2, 12))


def test_bfloat16_close_to_float32():
    module = _make(64, 96, 4, [0, 1, 3], gather=True, scatter=True)
    x = torch.randn(8, 16, 64)
    expected = _run(module, x, "reference")
    module_bf16 = module.to(torch.bfloat16)
    for strategy in STRATEGIES:
        y = _run(module_bf16, x.bfloat16(), strategy)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_extra_repr():
    text = repr(_make(12, 18, 3, [0, 2], gather=True, scatter=False))
    assert "in_features=12, out_features=18, groups=3, kept=2/3" in text
    assert "gather_input=True, scatter_output=False" in text


@pytest.mark.parametrize(("dynamo", "frozen"), [(True, False), (True, True), (False, True)])
def test_onnx_export_matches_onnxruntime(tmp_path, dynamo, frozen):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = _make(12, 18, 3, [0, 2], gather=True, scatter=True).eval()
    x = torch.randn(2, 5, 12)
    path = tmp_path / "gl.onnx"
    # frozen: no autograd graph needed, so only the export check keeps the fast kernels out
    module.requires_grad_(not frozen)
    with torch.set_grad_enabled(not frozen):
        torch.onnx.export(module, (x,), str(path), opset_version=18 if dynamo else 17,
                          input_names=["x"], dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    module = _make(64, 96, 4, [0, 1, 3], gather=True, scatter=True)
    x = torch.randn(8, 64)
    expected = _run(module, x, "reference")
    module_cuda = module.to("cuda")
    for strategy in STRATEGIES:
        y = _run(module_cuda, x.cuda(), strategy)
        torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_fast_kernels_share_scratch_without_clobbering_outputs():
    """Gathered inputs and pre-scatter outputs live in per-thread scratch on the CPU: an
    output handed back must survive the next module's call, in and out of inference mode."""
    torch.manual_seed(0)
    a = GroupedLinear(12, 18, 3, [0, 2], torch.randperm(12), torch.randperm(18))
    b = GroupedLinear(18, 12, 2, [1], torch.randperm(18), torch.randperm(12))
    a.requires_grad_(False)
    b.requires_grad_(False)
    x = torch.randn(300, 12)  # "bands" for a, "batched" for b
    with torch.no_grad():
        expect_a = x @ a.to_dense()[0].T + a.to_dense()[1]
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            ya = a(x)
            yb = b(ya)
            yb2 = b(torch.randn(7, 18))  # smaller: scratch views of the grown buffers
            torch.testing.assert_close(ya, expect_a, atol=1e-5, rtol=1e-5)
            wb, bb = b.to_dense()
            torch.testing.assert_close(yb, ya @ wb.T + bb, atol=1e-5, rtol=1e-5)
            assert yb2.shape == (7, 12)
    assert ya.data_ptr() != yb.data_ptr()
    from pgb.grouped_linear import _SCRATCH, release_scratch

    assert _SCRATCH.buffers  # the fast kernels did use the scratch
    release_scratch()
    assert "buffers" not in _SCRATCH.__dict__
    with torch.no_grad():
        torch.testing.assert_close(a(x), expect_a, atol=1e-5, rtol=1e-5)  # rebuilt


def test_keep_freed_memory_cuts_page_faults_of_a_grouped_ffn():
    """Three FFN blocks of MiniLM width at 4,096 tokens, timed after a warm-up, each setting
    in a fresh interpreter (the allocator setting is process-wide): with freed memory kept
    for reuse, the forwards fault in far fewer fresh pages."""
    code = """
import resource, sys, torch
from pgb.bench import keep_freed_memory
from pgb.grouped_linear import GroupedLinear
if sys.argv[1] == "reuse":
    assert keep_freed_memory()
torch.manual_seed(0)
up = GroupedLinear(384, 1536, 2, [0, 1], torch.randperm(384)).requires_grad_(False)
down = GroupedLinear(1536, 384, 2, [0, 1], None, torch.randperm(384)).requires_grad_(False)
x = torch.randn(4096, 384)
def forward():
    with torch.inference_mode():
        h = x
        for _ in range(3):
            h = torch.nn.functional.layer_norm(h + down(torch.nn.functional.gelu(up(h))), (384,))
forward()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
    import subprocess
    import sys

    faults = {}
    for setting in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", code, setting], capture_output=True,
                             text=True, check=True)
        faults[setting] = int(out.stdout.split()[-1])
    # measured over 12 forwards: 170,000-340,000 by default, 4,600-7,700 with reuse
    assert faults["reuse"] * 5 < faults["default"], faults
