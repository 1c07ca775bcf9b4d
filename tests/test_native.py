"""The native AVX2 grouped kernel: built where it can be, equal to the reference where it
runs, and a clean fallback to the PyTorch kernels where it cannot be had."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from test_surgery import compacted, logits
from tiny import tiny_batch, tiny_config

from pgb import grouped_kernels, native
from pgb.grouped_kernels import NATIVE_MAX_IB, NATIVE_TOKENS, BlockLayout, take_columns
from pgb.grouped_linear import GroupedLinear

CAN_BUILD = (platform.machine().lower() in ("x86_64", "amd64")
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
             and shutil.which("cc") is not None)
needs_native = pytest.mark.skipif(not CAN_BUILD, reason="needs x86-64 with AVX2 and a C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A native module that looks again, with its cache in a fresh folder."""
    monkeypatch.setenv("PGB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PGB_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    native.reset()
    yield monkeypatch
    native.reset()


def test_available_exactly_where_it_can_be_built():
    assert native.available() == CAN_BUILD, native.unavailable_reason()
    assert (native.unavailable_reason() is None) == CAN_BUILD


def _reference(layout, xb, weight, bias):
    """The block product in float64, dropped blocks 0, plus the bias."""
    yb = torch.zeros(xb.shape[0], layout.out_features, dtype=torch.float64)
    ib, ob = layout.ib, layout.ob
    for j, k in enumerate(layout._kept):
        yb[:, k * ob:(k + 1) * ob] = xb[:, k * ib:(k + 1) * ib].double() @ weight[j].double()
    return (yb if bias is None else yb + bias.double()).float()


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
# 1601 tokens: 17 row strips, enough for the strip-by-strip work order at 1 and 2 threads
@pytest.mark.parametrize("tokens", [1, 5, 6, 7, 97, 250, 1601])
@pytest.mark.parametrize("in_f, out_f, groups, kept", [
    (384, 1536, 8, list(range(8))),  # MiniLM FFN-in at G = 8: 16-wide tiles
    (45, 72, 3, [0, 2]),             # ob 24: a 16-wide and an 8-wide tile; a dropped block
    (95, 40, 5, [1, 2, 3]),          # ib 19, ob 8: one 8-wide tile per block
])
def test_kernel_matches_float64_reference(threads, tokens, in_f, out_f, groups, kept):
    g = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, in_f + 7, generator=g)
    xb = wide[:, 3:3 + in_f]  # rows of stride in_f + 7: the kernel reads strided rows
    layout = BlockLayout(in_f, out_f, groups, tuple(kept))
    weight = torch.randn(len(kept), in_f // groups, out_f // groups, generator=g)
    bias = torch.randn(out_f, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (bias, None):
            y = layout._run_fast("native", xb, weight, b)
            torch.testing.assert_close(y, _reference(layout, xb, weight, b),
                                       atol=2e-5, rtol=2e-5)
        out = torch.full((tokens, out_f), float("nan"))  # every element is written
        layout._run_fast("native", xb, weight, bias, out)
        torch.testing.assert_close(out, _reference(layout, xb, weight, bias),
                                   atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_kernel_gathers_its_input_through_a_column_map(tokens):
    """``cols``: the kernel reads block-ordered input i from column cols[i] of x, as the
    layer's in_index gather would, and the layer then skips its gathered copy."""
    g = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, 72 + 5, generator=g)
    x = wide[:, :72]  # rows of stride 77
    perm = torch.randperm(72, generator=g)
    layout = BlockLayout(72, 48, 3, (0, 2))
    weight = torch.randn(2, 24, 16, generator=g)
    bias = torch.randn(48, generator=g)
    y = native.grouped_mm(x, weight, bias, 3, layout._slot, cols=perm.to(torch.int32))
    torch.testing.assert_close(y, _reference(layout, x[:, perm], weight, bias),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="contiguous int32 map of 72"):
        native.grouped_mm(x, weight, bias, 3, layout._slot, cols=perm)  # int64
    layer = GroupedLinear(72, 48, 3, [0, 2], in_index=perm).requires_grad_(False)
    w_dense, b_dense = layer.to_dense()
    with torch.no_grad():
        assert layer.pick_strategy(x) == "native"
        torch.testing.assert_close(layer(x), x @ w_dense.T + b_dense, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("out_f", [64, 192])  # narrower and wider than the input
def test_gathering_layer_above_native_tokens_matches_dense(out_f):
    """Above NATIVE_TOKENS a short-block layer still runs natively and gathers its input
    as it reads, whatever its output width; it equals the dense layer."""
    layer = GroupedLinear(128, out_f, 4, [0, 1, 2, 3], in_index=torch.randperm(128))
    layer.requires_grad_(False)
    x = torch.randn(NATIVE_TOKENS + 76, 128)
    w, b = layer.to_dense()
    with torch.no_grad():
        assert layer.pick_strategy(x) == "native"
        assert layer.gathers_as_it_reads("native") and not layer.gathers_as_it_reads("conv")
        torch.testing.assert_close(layer(x), x @ w.T + b, atol=1e-5, rtol=1e-5)
    assert not GroupedLinear(128, out_f, 4, [0, 1, 2, 3]).gathers_as_it_reads("native")


@needs_native
def test_auto_picks_native_at_few_tokens_and_for_short_or_widening_blocks():
    many = "conv" if torch.backends.mkldnn.is_available() else "bands"
    layer = GroupedLinear(4 * 80, 4 * 48, 4, [0, 1, 2, 3]).requires_grad_(False)  # ib 80 > ob
    with torch.no_grad():
        assert layer.pick_strategy(torch.zeros(128, 320)) == "native"
        assert layer.pick_strategy(torch.zeros(NATIVE_TOKENS, 320)) == "native"
        assert layer.pick_strategy(torch.zeros(NATIVE_TOKENS + 1, 320)) == many
    for out_f in (4 * 80, 4 * 96):  # ib 80, ob 80 or 96: as wide out as in, or wider
        widening = GroupedLinear(320, out_f, 4, [0, 1, 2, 3]).requires_grad_(False)
        with torch.no_grad():
            assert widening.pick_strategy(torch.zeros(4096, 320)) == "native"
    odd = GroupedLinear(4 * 80, 4 * 88, 4, [0, 1, 2, 3]).requires_grad_(False)  # ob 88
    with torch.no_grad():
        assert odd.pick_strategy(torch.zeros(4096, 320)) == many
    short = GroupedLinear(4 * NATIVE_MAX_IB, 4 * 48, 4, [0, 1, 2, 3]).requires_grad_(False)
    narrow_short = GroupedLinear(4 * NATIVE_MAX_IB, 4 * 24, 4, [0, 1, 2, 3]).requires_grad_(False)
    with torch.no_grad():
        assert short.pick_strategy(torch.zeros(4096, 4 * NATIVE_MAX_IB)) == "native"
        assert narrow_short.pick_strategy(torch.zeros(4096, 4 * NATIVE_MAX_IB)) == many
    layer = GroupedLinear(48, 192, 4, [0, 1, 2, 3]).requires_grad_(False)
    with torch.no_grad():
        assert layer.pick_strategy(torch.zeros(128, 48, dtype=torch.float64)) == "batched"
        assert layer.pick_strategy(torch.zeros(48, 128).T) == "batched"  # column stride 128
    narrow = GroupedLinear(48, 12, 4, [0, 1, 2, 3]).requires_grad_(False)  # ob 3
    with torch.no_grad():
        assert narrow.pick_strategy(torch.zeros(128, 48)) == "batched"
    assert GroupedLinear(48, 192, 4, [0, 1]).pick_strategy(torch.zeros(8, 48)) == "reference"


@needs_native
@pytest.mark.parametrize("shared_order", [False, True])
def test_compact_model_through_the_native_kernel_equals_masked_dense(shared_order):
    config = tiny_config("bert")
    config.hidden_size, config.intermediate_size = 48, 96  # block widths multiples of 8
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    _, masked, compact = compacted(model, 0.5, shared_order=shared_order)
    batch = tiny_batch()
    layers = [m for m in compact.modules() if isinstance(m, GroupedLinear)]
    with torch.no_grad():
        picked = [m.pick_strategy(torch.zeros(40, m.in_features)) for m in layers]
    assert picked.count("native") >= len(layers) // 2, picked
    expected = logits(masked, batch)
    torch.testing.assert_close(logits(compact, batch), expected, atol=1e-5, rtol=1e-5)
    for m in layers:
        m.strategy = "reference"
    torch.testing.assert_close(logits(compact, batch), expected, atol=1e-5, rtol=1e-5)


def test_pgb_native_0_turns_it_off_and_layers_still_compute(fresh):
    fresh.setenv("PGB_NATIVE", "0")
    assert not native.available()
    assert native.unavailable_reason() == "PGB_NATIVE=0"
    layer = GroupedLinear(48, 192, 4, [0, 1, 2, 3]).requires_grad_(False)
    layer.strategy = "native"  # asked for, unavailable: the automatic choice instead
    x = torch.randn(10, 48)
    with torch.no_grad():
        assert layer.pick_strategy(x) == "batched"
        w, b = layer.to_dense()
        torch.testing.assert_close(layer(x), x @ w.T + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable: PGB_NATIVE=0"):
        native.grouped_mm(x, layer.weight, layer.bias, 4, layer._slot)


@pytest.mark.skipif(not CAN_BUILD, reason="the build is only tried on x86-64 with AVX2")
def test_no_compiler_or_a_failed_build_falls_back_with_the_reason(fresh, tmp_path):
    fresh.setenv("CC", str(tmp_path / "no-such-cc"))
    assert not native.available()
    assert "no C compiler" in native.unavailable_reason()
    assert "set CC" in native.unavailable_reason()
    native.reset()
    fresh.delenv("CC")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    fresh.setattr(native, "SOURCE", broken)
    assert not native.available()
    assert "broken.c failed" in native.unavailable_reason()
    assert not list((tmp_path / "native").glob("*.so"))  # no half-built library left


@needs_native
def test_the_build_is_cached_and_reused(fresh, tmp_path):
    assert native.available()
    built = list((tmp_path / "native").glob("grouped_mm_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.available()
    assert list((tmp_path / "native").glob("grouped_mm_*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, width, k", [(1, 5, 3), (7, 77, 77), (250, 131, 40),
                                            (1601, 384, 384)])
def test_column_gather_equals_index_select(threads, rows, width, k):
    """``gather_cols`` = ``x.index_select(1, cols)`` exactly: rows past the last group of
    four, a repeated column, strided input and output rows, 1 and 2 threads."""
    g = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, width + 3, generator=g)[:, :width]  # rows of stride width + 3
    cols = torch.randperm(width, generator=g)[:k]
    cols[-1] = cols[0]
    out = torch.full((rows, k + 2), float("nan"))[:, :k]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = native.gather_cols(x, cols.to(torch.int32), out=out)
    finally:
        torch.set_num_threads(before)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(y, x.index_select(1, cols))
    assert torch.equal(native.gather_cols(x, cols.to(torch.int32)), x.index_select(1, cols))
    with pytest.raises(ValueError, match="int32"):
        native.gather_cols(x, cols)
    with pytest.raises(TypeError, match="float32"):
        native.gather_cols(x.double(), cols.to(torch.int32))
    for bad in (-1, width):  # outside x's columns (the row stride is wider): refused
        wrong = cols.to(torch.int32)
        wrong[-1] = bad
        with pytest.raises(IndexError, match=f"outside \\[0, {width}\\)"):
            native.gather_cols(x, wrong)


@needs_native
def test_take_columns_uses_the_native_gather_only_where_it_may(monkeypatch):
    """Large float32 CPU gathers go native; float64, autograd and small ones keep
    index_select (gradients still flow); the values agree in every case."""
    calls = []
    real = native.gather_cols
    monkeypatch.setattr(native, "gather_cols", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(300, 200)
    idx = torch.randperm(200)
    assert torch.equal(take_columns(x, idx), x.index_select(1, idx)) and len(calls) == 1
    for other in (x.double(), x[:3]):
        assert torch.equal(take_columns(other, idx), other.index_select(1, idx))
    w = x.clone().requires_grad_(True)
    take_columns(w, idx).sum().backward()
    assert len(calls) == 1 and torch.equal(w.grad, torch.ones_like(w))
    monkeypatch.setattr(grouped_kernels, "NATIVE_GATHER", 1)
    assert torch.equal(take_columns(x[:3], idx), x[:3].index_select(1, idx)) and len(calls) == 2


@needs_native
def test_bad_arguments_are_refused():
    layout = BlockLayout(12, 18, 3, (0, 1, 2))  # ob 6: not a multiple of 8
    with pytest.raises(ValueError, match="ob=6"):
        native.grouped_mm(torch.randn(4, 12), torch.randn(3, 4, 6), None, 3, layout._slot)
    with pytest.raises(TypeError, match="float32"):
        native.grouped_mm(torch.randn(4, 24, dtype=torch.float64),
                          torch.randn(3, 8, 8, dtype=torch.float64), None, 3, layout._slot)


def test_speed_benchmark_switches_the_kernel_and_restores_the_setting(monkeypatch):
    """``benchmarks/speed.py --native-ab``: each variant runs with its kernel setting."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_bench", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    monkeypatch.setenv("PGB_NATIVE", "1")
    native.reset()
    with speed.native_kernel(False):
        assert not native.available()
    assert native.available() == CAN_BUILD
    if CAN_BUILD:
        with speed.native_kernel(True):
            assert native.available()
    else:
        with pytest.raises(SystemExit, match="no native kernel here"), \
                speed.native_kernel(True):
            pass
    assert os.environ["PGB_NATIVE"] == "1"
    native.reset()
