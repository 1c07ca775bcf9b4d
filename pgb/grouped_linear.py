"""Grouped linear layer: a linear map whose weight keeps only G diagonal blocks.

After PGB grouping, a weight matrix becomes block-diagonal once its rows and columns
are permuted. :class:`GroupedLinear` stores only the kept blocks and runs them as real
small matmuls, so a layer with G groups does 1/G of the dense FLOPs.

Kernel strategies (all compute the same function; ``GroupedLinear.strategy``):

- ``"bands"``: one ``torch.bmm(..., out=)`` whose output is a strided view of the
  result, so CPU BLAS writes every block straight into its band (one GEMM per block,
  ldc = out_features, no copies), then one in-place bias add. Best from ~256-512 tokens.
- ``"batched"``: one ``torch.bmm`` into a (G_kept, N, ob) temporary, then one pass
  that adds the bias while transposing to (N, G, ob). Best at few tokens.
- ``"conv"``: a grouped 1x1 convolution (``F.conv2d(..., groups=G)``, oneDNN on the
  CPU) on channels-last views, so input and output need no copy and the bias is fused.
  All blocks kept only. On the AMD EPYC 2-core machine, at 4,096 tokens and G = 2..8,
  it took 1-35% less time than "bands" (``benchmarks/results/grouped_linear_conv_epyc.md``
  against ``grouped_linear_bands_epyc.md``); at 128 tokens it was slower than "batched"
  in exploration, so "auto" keeps "batched" there.
- ``"native"``: pgb's own AVX2 + FMA kernel (``pgb/csrc``, built on first use, see
  :mod:`pgb.native`): register tiles straight from the input and the weight, bias fused,
  written once into the output. Float32 on x86-64 CPUs, block outputs a multiple of 8
  wide; fastest up to about a thousand tokens, so "auto" takes it there when it is built.
- ``"reference"``: differentiable and exportable ops only. Used whenever autograd needs
  a graph, and under ``torch.onnx.export`` / ``torch.export``.

Under ``torch.compile`` (nothing needing a gradient) the layer calls the fast kernels
through the custom op ``torch.ops.pgb.grouped_mm`` (``pgb.grouped_kernels``), which the
compiler keeps as one call; the index maps around it stay in the graph.

``"auto"`` (the default) picks per call from the token count and the layer's shape;
the rule comes from ``benchmarks/bench_grouped_linear.py`` runs (CPU, MKL, 2 threads).
Kept blocks are processed in runs of consecutive ids (one run when all are kept).
Ideas that measured slower are listed in ``benchmarks/results/grouped_linear.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# STRATEGIES, _SCRATCH, _runs and release_scratch are re-exported (callers import them here)
from . import native
from .grouped_kernels import (  # noqa: F401
    _SCRATCH,
    STRATEGIES,
    BlockKernels,
    _runs,
    _scratch,
    grouped_mm,
    release_scratch,
    take_columns,
)


def _as_index(index: Tensor | Sequence[int], n: int, name: str) -> Tensor:
    """Validate that `index` is a permutation of range(n) and return it as int64."""
    idx = torch.as_tensor(index).detach().to("cpu")
    if idx.dim() != 1 or idx.numel() != n:
        raise ValueError(f"{name} must be a 1-D permutation of length {n}, got shape "
                         f"{tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {idx.dtype}")
    idx = idx.long()
    if n and not torch.equal(torch.sort(idx).values, torch.arange(n)):
        bad = sorted(set(range(n)) - set(idx.tolist()))[:5]
        raise ValueError(f"{name} must be a permutation of 0..{n - 1}; it misses {bad}, "
                         f"so some entries are repeated or out of range")
    return idx


def _as_kept(kept: Tensor | Sequence[int], groups: int) -> list[int]:
    """Validate block ids: sorted, distinct, in [0, groups)."""
    ids = [int(k) for k in torch.as_tensor(kept, dtype=torch.long).reshape(-1).tolist()]
    for k in ids:
        if not 0 <= k < groups:
            raise ValueError(f"kept block id {k} is out of range [0, {groups}); "
                             f"pass block ids between 0 and groups - 1")
    if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
        raise ValueError(f"kept must be sorted and distinct, got {ids}; pass sorted(set(kept))")
    return ids


# torch.export (and the dynamo-based torch.onnx.export); the TorchScript-based ONNX
# exporter is caught by torch.jit.is_tracing()
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6


def _refresh_after_load(module: GroupedLinear, _incompatible_keys: object) -> None:
    """load_state_dict post hook (a module-level function keeps the module picklable)."""
    module._refresh()


class GroupedLinear(BlockKernels, nn.Module):
    """y = x W^T + b where W, after permutation, keeps only G diagonal blocks.

    Shapes: ``ib = in_features // groups``, ``ob = out_features // groups``.
    ``xb = x[..., in_index]`` (or ``x`` itself when ``in_index`` is None: the input
    already arrives in block order). For each kept block ``k`` (the ``j``-th entry of
    ``kept``)::

        yb[..., k*ob:(k+1)*ob] = xb[..., k*ib:(k+1)*ib] @ weight[j]

    bands of dropped blocks are 0, then ``yb += bias`` (bias in block order). Finally
    ``y[..., out_index] = yb`` (scatter back), or ``y = yb`` when ``out_index`` is None.

    Storage: ``weight`` is (G_kept, ib, ob), block ``j`` being the transpose of its
    (ob, ib) slice of the dense weight, so every kernel takes ``weight`` as is (a
    contiguous right-hand operand). Against (G_kept, ob, ib) fed as a transposed view it
    measured equal at 4,096 tokens and 5-12% faster at 128 tokens (2 threads, MKL).

    Worked example: in 4, out 6, groups 2, kept [1] (block 0 pruned): ib 2, ob 3,
    ``weight`` is (1, 2, 3), ``bias`` is (6,). With ``x = [x0, x1, x2, x3]`` and no
    index maps, ``y[0:3] = bias[0:3]`` and ``y[3:6] = [x2, x3] @ weight[0] + bias[3:6]``.
    With ``in_index = [3, 0, 1, 2]`` the block reads ``xb[2:4] = [x1, x2]`` instead.
    ``from_dense`` with ``row_perm = [0..5]`` and ``col_perm = [0..3]`` would fill
    ``weight[0] = W[3:6, 2:4].T`` from a dense (6, 4) ``W``.

    Args:
        in_features, out_features: sizes of the input and output (original order).
        groups: G, must divide both sizes.
        kept: sorted distinct block ids in [0, G) to keep (may be empty).
        in_index: optional permutation of length in_features: gather the input.
        out_index: optional permutation of length out_features: scatter the output.
        bias: learn an additive bias (stored in block order).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        kept: Tensor | Sequence[int],
        in_index: Tensor | None = None,
        out_index: Tensor | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size < 1 or size % groups:
                raise ValueError(f"groups={groups} must divide {name}={size}; pick G from "
                                 f"the common divisors of in_features and out_features")
        kept_ids = _as_kept(kept, groups)
        self.set_layout(in_features, out_features, groups, kept_ids)
        self.strategy = "auto"
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(len(kept_ids), self.ib, self.ob, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("kept", torch.tensor(kept_ids, dtype=torch.long, device=device))
        for name, idx, n in (("in_index", in_index, in_features),
                             ("out_index", out_index, out_features)):
            buf = None if idx is None else _as_index(idx, n, name).to(device)
            self.register_buffer(name, buf)
        # argsort(out_index): the scatter runs as a gather (index_select is the fast op)
        self.register_buffer("_out_gather", None, persistent=False)
        self._refresh()
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.reset_parameters()

    def _refresh(self) -> None:
        """Rebuild the Python-side views of the buffers (after init or a state_dict load)."""
        kept = _as_kept(self.kept.cpu(), self.groups)
        if len(kept) != self.weight.shape[0]:
            raise ValueError(f"kept lists {len(kept)} blocks but weight holds "
                             f"{self.weight.shape[0]}; load a state_dict saved with the same kept")
        self.set_layout(self.in_features, self.out_features, self.groups, kept)
        # the native kernel reads the input through in_index itself (no gathered copy)
        self._in_cols = None
        if self.in_index is not None:
            idx = _as_index(self.in_index, self.in_features, "in_index")
            self._in_cols = idx.to(torch.int32).contiguous()
        self._out_cols = None
        if self.out_index is not None:
            idx = _as_index(self.out_index, self.out_features, "out_index")
            self._out_gather = torch.argsort(idx).to(self.out_index.device)
            self._out_cols = self._out_gather.to(torch.int32).contiguous()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, with fan_in = in_features / groups (one block's)."""
        bound = self.ib**-0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        groups: int,
        kept: Tensor | Sequence[int],
        row_perm: Tensor,
        col_perm: Tensor,
        gather_input: bool,
        scatter_output: bool,
    ) -> GroupedLinear:
        """Cut the kept blocks out of a dense (out, in) weight in original index order.

        Block b is rows ``row_perm[b*ob:(b+1)*ob]`` x columns ``col_perm[b*ib:(b+1)*ib]``.
        ``gather_input``: the module gathers ``x[..., col_perm]`` itself; otherwise the
        caller feeds inputs already in col_perm order. ``scatter_output``: outputs come
        back in original order; otherwise in row_perm order (bias permuted to match).
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        rows = _as_index(row_perm, out_f, "row_perm").to(weight.device)
        cols = _as_index(col_perm, in_f, "col_perm").to(weight.device)
        module = cls(in_f, out_f, groups, kept, in_index=cols if gather_input else None,
                     out_index=rows if scatter_output else None, bias=bias is not None,
                     device=weight.device, dtype=weight.dtype)
        ib, ob = module.ib, module.ob
        wp = weight.detach()[rows][:, cols]  # (out, in) in block order
        with torch.no_grad():
            for j, k in enumerate(module._kept):
                module.weight[j] = wp[k * ob:(k + 1) * ob, k * ib:(k + 1) * ib].T
            if bias is not None:
                module.bias.copy_(bias.detach()[rows])
        return module

    @torch.no_grad()
    def to_dense(self) -> tuple[Tensor, Tensor]:
        """The masked dense (weight (out, in), bias (out,)) an nn.Linear needs to match
        this module on its own input and output coordinates (index maps included).
        Fresh tensors, detached from the parameters."""
        ib, ob = self.ib, self.ob
        w = self.weight.new_zeros(self.out_features, self.in_features)  # block order
        for j, k in enumerate(self._kept):
            w[k * ob:(k + 1) * ob, k * ib:(k + 1) * ib] = self.weight[j].T
        b = self.bias.clone() if self.bias is not None else w.new_zeros(self.out_features)
        if self.in_index is not None:  # xb[i] = x[in_index[i]] -> column in_index[i]
            w = w.new_zeros(w.shape).index_copy(1, self.in_index, w)
        if self.out_index is not None:  # y[out_index[r]] = yb[r] -> row out_index[r]
            w = w.new_zeros(w.shape).index_copy(0, self.out_index, w)
            b = b.new_zeros(b.shape).index_copy(0, self.out_index, b)
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        # Parameters and buffers come straight from the module's dicts: nn.Module's
        # attribute fallback costs ~1 us a lookup, a sizeable part of a call at 128 tokens.
        in_f, out_f = self.in_features, self.out_features
        if x.shape[-1] != in_f:
            raise ValueError(f"expected input (..., {in_f}), got {tuple(x.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, in_f)  # (N, in)
        params, buffers = self._parameters, self._buffers
        weight = params.get("weight")
        if weight is None:  # e.g. a parametrization took it over
            weight = self.weight
        bias = params["bias"] if "bias" in params else self.bias  # bias=False: plain None
        in_index, out_gather = buffers["in_index"], buffers["_out_gather"]
        strategy = self._pick(x2, weight, bias)
        if strategy in ("reference", "op"):
            xb = x2 if in_index is None else x2.index_select(1, in_index)
            yb = self._forward_reference(xb, weight, bias) if strategy == "reference" else \
                grouped_mm(xb, weight, bias, self.groups, self._kept, self.strategy)
            y = yb if out_gather is None else yb.index_select(1, out_gather)
        else:
            # the gathered input and the pre-scatter output never leave this call: on the
            # CPU they live in per-thread scratch (a fresh tensor per call costs page faults)
            n = x2.shape[0]
            # "conv" allocates its own output (handed back as a view); the others fill out
            out = None if out_gather is None or strategy == "conv" else \
                _scratch(1, n, out_f, x2)
            if self.gathers_as_it_reads(strategy):
                yb = native.grouped_mm(x2, weight, bias, self.groups, self._slot, out,
                                       cols=self._in_cols)
            else:
                xb = x2 if in_index is None else take_columns(
                    x2, in_index, self._in_cols, out=_scratch(0, n, in_f, x2))
                yb = self._run_fast(strategy, xb, weight, bias, out)
            y = yb if out_gather is None else take_columns(yb, out_gather, self._out_cols)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)

    def gathers_as_it_reads(self, strategy: str) -> bool:
        """Whether the forward hands the native kernel the input's column map instead of a
        gathered copy: cheaper where it runs (384->384 at G = 6, 4,096 tokens: 1.5 against
        2.4 ms; 384->1536 at G = 12: 4.2 against 4.9;
        benchmarks/results/layers_native_ab_mrpc_s0.875_wide.md)."""
        return strategy == "native" and self._in_cols is not None

    def pick_strategy(self, xb: Tensor) -> str:
        """The kernel used for input `xb` (N, in): "reference" when autograd or export
        needs it, "op" (``grouped_mm``) inside ``torch.compile``, else ``self.strategy``,
        where "auto" decides from N and the shape."""
        return self._pick(xb, self.weight, self.bias)

    def _pick(self, xb: Tensor, weight: Tensor, bias: Tensor | None) -> str:
        strategy = self.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        # cheap checks only: at 128 tokens the whole layer runs in ~0.1 ms
        needs_graph = torch.is_grad_enabled() and (
            xb.requires_grad or weight.requires_grad
            or (bias is not None and bias.requires_grad))
        exporting = _is_exporting() or torch.jit.is_tracing()
        if needs_graph or exporting or strategy == "reference" or not self._kept:
            return "reference"
        if torch.compiler.is_compiling():  # the fast kernels, opaque to the compiler
            return "op"
        return self._fast_strategy(xb, strategy)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.groups}, kept={len(self._kept)}/{self.groups}, "
                f"bias={self.bias is not None}, gather_input={self.in_index is not None}, "
                f"scatter_output={self.out_index is not None}")
