"""The kernels of :class:`pgb.grouped_linear.GroupedLinear`, and the custom op that runs
them inside ``torch.compile`` graphs.

All kernels map block-ordered input ``xb`` (N, in) to block-ordered output (N, out); the
index maps around them belong to the layer. They read the block layout (``groups``,
``ib``, ``ob``, the kept-block runs ...) from ``self``: :class:`BlockKernels` is a mixin
shared by the layer and by :class:`BlockLayout`, the same layout without tensors.

``torch.ops.pgb.grouped_mm`` wraps the fast CPU kernels as one opaque op, so that
``torch.compile`` keeps them (and fuses the ops around them) instead of lowering the
layer's differentiable reference path: on the 2-core CPU, that lowering made compiled
MiniLM-L6 MRPC models 1.36x (S = 0.5) and 1.49x (S = 0.875) slower than eager at batch
32 x 128, where eager runs oneDNN's grouped convolution
(``benchmarks/results/compile_before_op.md``; with the op, ``compile.md``).
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

STRATEGIES = ("auto", "reference", "bands", "batched", "conv", "native")

# "auto" uses "native" (pgb's own AVX2 kernel, where it is available and fits) up to
# NATIVE_TOKENS tokens, and above that for blocks whose outputs are a multiple of 16 wide
# and at least as many as their inputs, or at most NATIVE_MAX_IB inputs wide. Where a
# block reads more than it writes (FFN-out, 1536->384), oneDNN's convolution stays ahead
# at thousands of tokens (G = 8: 4.3 against 4.8 ms); elsewhere the native kernel is level
# or ahead, and more so when it gathers the input as it reads (384->384 at G = 4, 4,096
# tokens: 1.9 against 2.2 ms; layers_native_ab_*_wide.md).
# Otherwise "batched" up to SMALL_TOKENS tokens (twice as many when the output is the
# narrower side), "conv" (all blocks kept, CPU with oneDNN) or else "bands" above.
# Measured batched/bands crossover on 2 threads for MiniLM shapes at G = 2..8: 256-384
# tokens for 384->1536 and 384->384, ~512 for 1536->384.
SMALL_TOKENS = 256
NATIVE_TOKENS = 1024
NATIVE_MAX_IB = 64
# Column gathers of at least this many values go through the native gather (below, the
# ~5 us of a ctypes call outweigh what it saves).
NATIVE_GATHER = 32768

_SCRATCH = threading.local()
_ONEDNN = torch.backends.mkldnn.is_available()


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ids as half-open ranges: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for k in ids:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def _scratch(slot: int, rows: int, cols: int, like: Tensor) -> Tensor:
    """A (rows, cols) tensor for an intermediate of the fast kernels: per thread and slot,
    one CPU buffer kept between calls and grown to the largest size seen (at 32 x 128
    tokens and hidden 384: 6 MiB per slot); elsewhere (CUDA) a fresh tensor, since the
    caching allocator already makes those cheap. ``release_scratch()`` frees the buffers."""
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (slot, like.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buf = buffers[key] = torch.empty(rows * cols, dtype=like.dtype)
    return buf[:rows * cols].view(rows, cols)


def take_columns(x: Tensor, index: Tensor, cols: Tensor | None = None,
                 out: Tensor | None = None) -> Tensor:
    """``x.index_select(1, index)`` for a 2-D ``x`` (into ``out`` when given), through the
    native gather (:func:`pgb.native.gather_cols`) where it runs: float32 on the CPU, unit
    column stride, no autograd, and at least NATIVE_GATHER values. ``cols``: ``index`` as
    contiguous int32, when the caller keeps one. Same values either way."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
            and x.shape[0] * index.numel() >= NATIVE_GATHER
            and not (x.requires_grad and torch.is_grad_enabled()) and native.available()):
        if cols is None:
            cols = index.to(torch.int32).contiguous()
        return native.gather_cols(x, cols, out)
    return x.index_select(1, index) if out is None else torch.index_select(x, 1, index, out=out)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are rebuilt on the next fast forward)."""
    _SCRATCH.__dict__.pop("buffers", None)


class BlockKernels:
    """Kernels over a block layout held in ``self`` (see :meth:`set_layout`)."""

    def set_layout(self, in_features: int, out_features: int, groups: int,
                   kept: list[int]) -> None:
        """Layout fields the kernels read; ``kept``: sorted distinct block ids."""
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.ib, self.ob = in_features // groups, out_features // groups
        self._kept = list(kept)
        # blocks are processed in runs of consecutive ids: one strided view per run
        # (one run in the common all-kept case). kept run (k0, k1) holds weight[j0:j1].
        self._kept_runs = [(self._kept.index(k0), k0, k1) for k0, k1 in _runs(self._kept)]
        kept_set = set(self._kept)
        self._dropped_runs = _runs([k for k in range(groups) if k not in kept_set])
        self._all_kept = len(self._kept) == groups
        # the native kernel's block map: block g -> its index in weight, -1 when dropped
        slot = {k: j for j, k in enumerate(self._kept)}
        self._slot = torch.tensor([slot.get(g, -1) for g in range(groups)], dtype=torch.int32)

    def _native_fits(self, xb: Tensor) -> bool:
        """Whether the native kernel takes this input: float32 rows of unit column stride
        on the CPU, block outputs a multiple of 8 wide, and the kernel built here."""
        return (self.ob % 8 == 0 and xb.dtype == torch.float32 and xb.device.type == "cpu"
                and xb.stride(-1) == 1 and native.available())

    def _fast_strategy(self, xb: Tensor, strategy: str) -> str:
        """The fast kernel for ``strategy`` (not "reference") and input (N, in)."""
        if strategy == "conv" and not self._all_kept:
            return "bands"  # the convolution has no place for a dropped block
        if strategy == "native" and not self._native_fits(xb):
            strategy = "auto"  # another CPU, no compiler, or a shape it does not take
        if strategy != "auto":
            return strategy
        wide = self.ob % 16 == 0 and (self.ib <= self.ob or self.ib <= NATIVE_MAX_IB)
        if (xb.shape[0] <= NATIVE_TOKENS or wide) and self._native_fits(xb):
            return "native"
        return self._torch_strategy(xb)

    def _torch_strategy(self, xb: Tensor) -> str:
        """What "auto" takes among PyTorch's kernels (where the native one does not run)."""
        # "bands" writes every block once, in place; "batched" adds a (Gk, N, ob)
        # temporary and a transposing pass, which pays off at few tokens; oneDNN's
        # grouped convolution beats both from a few hundred tokens up on the CPU.
        small = SMALL_TOKENS * (2 if self.in_features > self.out_features else 1)
        if xb.shape[0] <= small:
            return "batched"
        onednn = _ONEDNN and torch.backends.mkldnn.enabled  # off: conv2d's slow fallback
        return "conv" if self._all_kept and xb.device.type == "cpu" and onednn else "bands"

    def _run_fast(self, strategy: str, xb: Tensor, weight: Tensor, bias: Tensor | None,
                  out: Tensor | None = None) -> Tensor:
        """One fast kernel: "conv" allocates its output; the others write into ``out``
        (N, out) when given, else into a fresh tensor."""
        if strategy == "conv":
            return self._forward_conv(xb, weight, bias)
        if strategy == "native":
            return native.grouped_mm(xb, weight, bias, self.groups, self._slot, out)
        kernel = self._forward_bands if strategy == "bands" else self._forward_batched
        return kernel(xb, weight, bias, out)

    def _forward_reference(self, xb: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Differentiable, export-friendly path. (N, in) block order -> (N, out). With
        dropped blocks it also reads the layer's ``kept`` buffer (a tensor, so that export
        traces it), which a :class:`BlockLayout` lacks: the layer's path only."""
        n, g, ob = xb.shape[0], self.groups, self.ob
        if self._kept:
            xv = xb.unflatten(1, (g, self.ib))  # (N, G, ib)
            if len(self._kept) < g:
                xv = xv.index_select(1, self.kept)  # (N, Gk, ib)
            yk = torch.bmm(xv.transpose(0, 1), weight)  # (Gk, N, ob)
            if len(self._kept) == g:
                yb = yk.transpose(0, 1).reshape(n, self.out_features)
            else:
                zero = yk.new_zeros(n, ob)
                band = dict(zip(self._kept, yk.unbind(0), strict=True))
                yb = torch.cat([band.get(k, zero) for k in range(g)], dim=1)  # (N, out)
        else:
            yb = xb.new_zeros(n, self.out_features)
        return yb if bias is None else yb + bias

    def _forward_bands(self, xb: Tensor, weight: Tensor, bias: Tensor | None,
                       y: Tensor | None = None) -> Tensor:
        """bmm straight into the output bands, then one in-place bias add (into ``y``,
        (N, out), when given)."""
        n, g, ob = xb.shape[0], self.groups, self.ob
        y = xb.new_empty(n, self.out_features) if y is None else y
        xv = xb.view(n, g, self.ib).transpose(0, 1)  # (G, N, ib), a strided view
        yv = y.view(n, g, ob).transpose(0, 1)  # (G, N, ob), a strided view of y
        if self._all_kept:  # one run, no slicing (per-call overhead matters at few tokens)
            torch.bmm(xv, weight, out=yv)
            return y if bias is None else y.add_(bias)
        for j0, k0, k1 in self._kept_runs:
            # out= a strided view: CPU BLAS writes each block in place (ldc = out)
            torch.bmm(xv[k0:k1], weight[j0:j0 + k1 - k0], out=yv[k0:k1])
        for k0, k1 in self._dropped_runs:
            yv[k0:k1].zero_()
        return y if bias is None else y.add_(bias)

    def _forward_batched(self, xb: Tensor, weight: Tensor, bias: Tensor | None,
                         y: Tensor | None = None) -> Tensor:
        """bmm into a (Gk, N, ob) temporary, then bias + transpose in one pass (into
        ``y``, (N, out), when given)."""
        n, g, ob = xb.shape[0], self.groups, self.ob
        y = xb.new_empty(n, self.out_features) if y is None else y
        xv = xb.view(n, g, self.ib).transpose(0, 1)  # (G, N, ib), a strided view
        yv = y.view(n, g, ob)  # (N, G, ob)
        bias = None if bias is None else bias.view(g, ob)
        if self._all_kept:  # one run, no slicing (per-call overhead matters at few tokens)
            yk = torch.bmm(xv, weight).transpose(0, 1)  # (N, G, ob)
            if bias is None:
                yv.copy_(yk)
            else:
                torch.add(yk, bias, out=yv)
            return y
        for j0, k0, k1 in self._kept_runs:
            yk = torch.bmm(xv[k0:k1], weight[j0:j0 + k1 - k0])  # (run, N, ob)
            yk = yk.transpose(0, 1)  # (N, run, ob)
            if bias is None:
                yv[:, k0:k1].copy_(yk)
            else:
                torch.add(yk, bias[k0:k1], out=yv[:, k0:k1])
        for k0, k1 in self._dropped_runs:
            if bias is None:
                yv[:, k0:k1].zero_()
            else:
                yv[:, k0:k1].copy_(bias[k0:k1].expand(n, k1 - k0, ob))
        return y

    def _forward_conv(self, xb: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """All blocks kept: a grouped 1x1 convolution over the tokens. (N, in) is viewed as
        a channels-last (1, in, N, 1) image and the (1, out, N, 1) channels-last result
        as (N, out), so neither side is copied; the bias is added inside."""
        n = xb.shape[0]
        weight = weight.transpose(1, 2).reshape(self.out_features, self.ib, 1, 1)
        image = xb.view(1, n, 1, self.in_features).permute(0, 3, 1, 2)
        out = F.conv2d(image, weight, bias, groups=self.groups)
        return out.permute(0, 2, 3, 1).reshape(n, self.out_features)  # a channels-last view


class BlockLayout(BlockKernels):
    """A block layout with no tensors: the kernels of a layer, callable from the op."""

    def __init__(self, in_features: int, out_features: int, groups: int,
                 kept: tuple[int, ...]) -> None:
        self.set_layout(in_features, out_features, groups, list(kept))


@functools.lru_cache(maxsize=256)
def _layout(in_features: int, out_features: int, groups: int,
            kept: tuple[int, ...]) -> BlockLayout:
    return BlockLayout(in_features, out_features, groups, kept)


@torch.library.custom_op("pgb::grouped_mm", mutates_args=())
def grouped_mm(xb: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
               kept: list[int], strategy: str) -> Tensor:
    """Block-ordered (N, in) -> (N, out) through the fast kernel ``strategy`` picks
    (not "reference"), for ``weight`` (len(kept), in/G, out/G). No autograd: compiled
    layers use it only when nothing needs a gradient."""
    layout = _layout(xb.shape[1], groups * weight.shape[2], groups, tuple(kept))
    return layout._run_fast(layout._fast_strategy(xb, strategy), xb, weight, bias).contiguous()


@grouped_mm.register_fake
def _grouped_mm_fake(xb: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                     kept: list[int], strategy: str) -> Tensor:
    return xb.new_empty(xb.shape[0], groups * weight.shape[2])
