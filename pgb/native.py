"""pgb's native CPU kernels (``pgb/csrc/grouped_mm_avx2.c``), built on first use: the grouped
layers' matrix product, a column gather, and training's dropout masks (:mod:`pgb.dropout`).

On an x86-64 CPU with AVX2 and FMA, the first grouped layer that asks for it compiles the
kernel with the system C compiler (``$CC``, else ``cc``) into a cache folder and loads it
with :mod:`ctypes`; later processes load the cached library. It runs on torch's own
OpenMP threads (``torch.get_num_threads()``). Where it cannot be had (another CPU, no
compiler, a failed build, ``PGB_NATIVE=0``) :func:`available` is False, one log line says
why, and grouped layers keep their PyTorch kernels: the same results, only slower at few
tokens.

Cache folder: ``$PGB_CACHE_DIR``, else ``$XDG_CACHE_HOME/pgb``, else ``~/.cache/pgb``; the
library's name carries a hash of the source, the flags and the compiler's version, so an
edit or another compiler builds anew. Builds go to a temporary file renamed into place, so
concurrent processes never load a half-written library.

Example::

    >>> from pgb import native
    >>> native.available()            # builds or loads the kernel once per process
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "grouped_mm_avx2.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c99", "-shared", "-fPIC")

_state: dict = {}  # "lib": the loaded library or None, "why": the reason it is None
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("PGB_CACHE_DIR"):
        return Path(os.environ["PGB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgb"


def available() -> bool:
    """Whether the native kernel is loaded (building it on the first call)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _load()
                _state.update(lib=lib, why=why)
                if lib is None:
                    log.info("native grouped kernel unavailable (%s); grouped layers use "
                             "the PyTorch kernels", why)
    return _state["lib"] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    available()
    return _state["why"]


def reset() -> None:
    """Forget the loaded library, so the next :func:`available` looks again (tests)."""
    with _lock:
        _state.clear()


def _cpu_supported() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {capability}, the kernel needs AVX2 and FMA"
    return None


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("PGB_NATIVE", "1") == "0":
        return None, "PGB_NATIVE=0"
    why = _cpu_supported()
    if why:
        return None, why
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH; set CC"
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"building or loading {SOURCE.name} failed: {err}"
    fn = lib.pgb_grouped_mm
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, i64, p, p, p, i64, i32, i32, i32, p, p, i32]
    fn.restype = i32
    lib.pgb_gather_cols.argtypes = [p, i64, i64, i64, p, i64, p, i64, i32]
    lib.pgb_gather_cols.restype = i32
    lib.pgb_dropout.argtypes = [p, p, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i32]
    lib.pgb_dropout.restype = i32
    return lib, None


def _build(compiler: str) -> Path:
    """The cached library for this source, flags and compiler, built if missing."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()
                         + version.encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"grouped_mm_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise subprocess.SubprocessError(
                f"{compiler} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build lands the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the native grouped kernel: %s", target)
    return target


def grouped_mm(xb: Tensor, weight: Tensor, bias: Tensor | None, groups: int, slot: Tensor,
               out: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """Block-ordered ``xb`` (N, in) -> (N, out) through the native kernel (into ``out``
    when given). ``weight`` (kept, in/G, out/G); ``slot`` (G,) int32: each block's index in
    ``weight``, -1 for a dropped block. Float32 CPU tensors; ``xb`` and ``out`` with unit
    column stride; out/G a multiple of 8. ``cols`` (in,) int32, contiguous: ``xb`` is not
    in block order, and block-ordered input i is read from its column ``cols[i]`` (the
    gather ``xb[:, cols]`` done inside the kernel, with no copy)."""
    if not available():
        raise RuntimeError(f"the native grouped kernel is unavailable: {_state['why']}")
    if xb.dtype != torch.float32 or weight.dtype != torch.float32 or \
            (bias is not None and bias.dtype != torch.float32):
        raise TypeError("the native grouped kernel takes float32 tensors only")
    n = xb.shape[0]
    ib, ob = weight.shape[1], weight.shape[2]
    if cols is not None and (cols.dtype != torch.int32 or not cols.is_contiguous()
                             or cols.numel() != groups * ib):
        raise ValueError(f"cols must be a contiguous int32 map of {groups * ib} input "
                         f"columns, got {cols.dtype} of {cols.numel()}")
    y = xb.new_empty(n, groups * ob) if out is None else out
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    status = _state["lib"].pgb_grouped_mm(
        xb.data_ptr(), n, xb.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), groups, ib,
        ob, slot.data_ptr(), None if cols is None else cols.data_ptr(),
        torch.get_num_threads())
    if status:
        raise ValueError(f"native grouped kernel refused its arguments: N={n}, G={groups}, "
                         f"ib={ib}, ob={ob} (ob must be a multiple of 8)")
    return y


def gather_cols(x: Tensor, cols: Tensor, out: Tensor | None = None) -> Tensor:
    """``x[:, cols]`` (into ``out`` when given) for a float32 CPU ``x`` (N, in) with unit
    column stride; ``cols`` (k,) int32, contiguous, each in [0, in) (an index outside
    raises IndexError, as index_select does). The same values as
    ``x.index_select(1, cols)``, 1.2-2.8x faster (``benchmarks/results/gather_cols.md``)."""
    if not available():
        raise RuntimeError(f"the native grouped kernel is unavailable: {_state['why']}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.device.type != "cpu":
        raise TypeError("gather_cols takes a 2-D float32 CPU tensor with unit column stride")
    if cols.dtype != torch.int32 or not cols.is_contiguous():
        raise ValueError(f"cols must be a contiguous int32 index, got {cols.dtype}")
    n, k = x.shape[0], cols.numel()
    y = x.new_empty(n, k) if out is None else out
    if y.shape != (n, k) or y.dtype != torch.float32 or (k and y.stride(1) != 1):
        raise ValueError(f"out must be a float32 ({n}, {k}) tensor with unit column stride")
    status = _state["lib"].pgb_gather_cols(x.data_ptr(), n, x.stride(0), x.shape[1],
                                           cols.data_ptr(), k, y.data_ptr(), y.stride(0),
                                           torch.get_num_threads())
    if status == 2:
        raise IndexError(f"gather_cols: a column index is outside [0, {x.shape[1]}) "
                         f"(min {int(cols.min())}, max {int(cols.max())})")
    return y


def dropout_mask_apply(x: Tensor, p: float, seed: int, out: Tensor | None = None) -> Tensor:
    """``x`` times a dropout mask of rate ``p`` scaled by 1 / (1 - p) (into ``out`` when
    given), for a contiguous float32 CPU ``x`` of fewer than 2^32 values. The mask is a
    function of ``seed`` (0 <= seed < 2^64) and of each value's position only, so the same
    seed on the gradient gives the backward pass (see :mod:`pgb.dropout`)."""
    if not available():
        raise RuntimeError(f"the native grouped kernel is unavailable: {_state['why']}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise TypeError("dropout_mask_apply takes a contiguous float32 CPU tensor")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    y = torch.empty_like(x) if out is None else out
    if y.shape != x.shape or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(x.shape)}")
    threshold = min(round(p * 2 ** 32), 2 ** 32 - 1)
    status = _state["lib"].pgb_dropout(x.data_ptr(), y.data_ptr(), x.numel(), seed, threshold,
                                       1.0 / (1.0 - p), torch.get_num_threads())
    if status:
        raise ValueError(f"native dropout refused {x.numel()} values (at most 2^32 - 1)")
    return y
