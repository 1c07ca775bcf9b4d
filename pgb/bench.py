"""Measured cost of models side by side: latency, throughput, size, memory, FLOPs.

Latency is the median of repeated forward passes after warm-up, the models timed in turn
(interleaved) inside one process so that machine noise hits all of them alike;
``latency_spread`` says how steady the timings were (see :func:`latency_spread`). Peak
memory is measured per model in a fresh subprocess on the CPU (peak resident set size of
loading the model and running one batch) and with the allocator's peak on CUDA.

Example::

    >>> res = bench_folders({"compressed": "runs/sst2-pgb", "baseline": "runs/sst2"},
    ...                     batch_size=32, seq_len=128)
    >>> res["compressed"]["latency_ms"], res["baseline"]["latency_ms"]
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import native
from .flops import count_params, flops

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit systems


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory instead of returning it to the OS.

    By default every large tensor a forward pass allocates (a 32 x 128 batch of MiniLM
    intermediate activations is 25 MB) may be fresh memory from the kernel, paid in page
    faults on first touch. On a 2-core CPU the compact MiniLM-L6 at S = 0.5 went from 714 to
    632 ms per 32 x 128 forward, the dense teacher from 964 to 872 ms
    (benchmarks/results/speed_glibc_default.md, speed_reuse_memory.md). This serves
    blocks up to 32 MiB from malloc's heap and never trims it, as jemalloc and tcmalloc
    do; the process keeps its peak memory. Process-wide, for CPU serving; returns False
    (and changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.warning("keep_freed_memory: the C library is not glibc; nothing changed "
                    "(use jemalloc or tcmalloc through LD_PRELOAD instead)")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def load_any(folder: str) -> nn.Module:
    """A pgb output folder (compact or structured) or a plain transformers checkpoint."""
    from .checkpoint import load
    from .modeling import is_pgb_folder, load_config, resolve_model

    folder = resolve_model(folder)  # a missing folder is named as one, not as a hub id
    if is_pgb_folder(folder) or (Path(folder) / "structure.json").is_file():
        return load(folder)
    import transformers

    config = load_config(folder)
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    return cls.from_pretrained(folder).eval()


def dummy_batch(model: nn.Module, batch_size: int, seq_len: int, device) -> dict:
    """Random token ids (full attention) shaped like a real batch."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) for k, v in batch.items()}


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) + \
        sum(p.stat().st_size for p in Path(folder).glob("*.bin"))


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], batch: dict, repeats: int = 20,
                warmup: int = 3, progress: bool = True) -> dict[str, list[float]]:
    """Seconds per forward pass of each model, timed in turn, after ``warmup`` passes each."""
    device = batch["input_ids"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model in models.values():
        for _ in range(warmup):
            model(**batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(repeats), desc="timing", disable=not progress):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            model(**batch)
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_mb(folder: str, batch_size: int, seq_len: int, device: str,
                   threads: int | None) -> float:
    """Peak memory (MiB) of loading ``folder`` and running one batch, measured in isolation."""
    if device.startswith("cuda"):
        model = load_any(folder).to(device)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(**dummy_batch(model, batch_size, seq_len, device))
        return torch.cuda.max_memory_allocated() / 2**20
    code = ("import resource,sys,torch;from pgb.bench import load_any,dummy_batch;"
            f"torch.set_num_threads({threads or torch.get_num_threads()});"
            f"m=load_any({folder!r});"
            f"torch.inference_mode()(lambda: m(**dummy_batch(m,{batch_size},{seq_len},'cpu')))();"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB on Linux


NOISY_SPREAD = 0.2  # a latency spread above this is warned about by ``pgb bench``


def latency_spread(times: list[float]) -> float | None:
    """How steady repeated timings were: (90th - 10th percentile) / median. None with
    fewer than 5 timings (too few for percentiles)."""
    if len(times) < 5:
        return None
    # 9 cut points, the 10th ... 90th percentile; "inclusive" stays within the timings
    # ("exclusive", the default, extrapolates beyond them when there are few)
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return (cuts[-1] - cuts[0]) / statistics.median(times)


def bench_folders(folders: dict[str, str], batch_size: int, seq_len: int,
                  repeats: int = 20, warmup: int = 3, threads: int | None = None,
                  device: str | None = None, memory: bool = True,
                  progress: bool = True, reuse_memory: bool = False,
                  compile_backend: str | None = None) -> dict[str, dict]:
    """Measure every model folder; returns name -> metrics (see module docstring).
    ``reuse_memory`` calls :func:`keep_freed_memory` first (every model runs under it);
    ``compile_backend`` (e.g. "inductor") times every model through ``torch.compile`` with
    that backend; the first warm-up pass compiles."""
    if threads:
        torch.set_num_threads(threads)
    if reuse_memory and not keep_freed_memory():
        raise RuntimeError("reuse_memory needs glibc's mallopt, which this system lacks; "
                           "measure without it, or preload jemalloc or tcmalloc")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = {name: load_any(f).to(device).eval() for name, f in folders.items()}
    batch = dummy_batch(next(iter(models.values())), batch_size, seq_len, device)
    runners = models if compile_backend is None else {
        n: torch.compile(m, backend=compile_backend) for n, m in models.items()}
    times = time_models(runners, batch, repeats,
                        warmup if compile_backend is None else max(warmup, 1), progress)
    out = {}
    for name, model in models.items():
        med = statistics.median(times[name])
        out[name] = {
            "latency_ms": med * 1e3, "latency_ms_min": min(times[name]) * 1e3,
            "latency_spread": latency_spread(times[name]),
            "throughput_seq_s": batch_size / med, "params": count_params(model),
            "checkpoint_bytes": checkpoint_bytes(folders[name]),
            "flops": flops(model, seq_len) * batch_size,
            "peak_memory_mb": peak_memory_mb(folders[name], batch_size, seq_len, device,
                                             threads) if memory else None,
        }
    return out


SETTINGS = ("batch_size", "seq_len", "threads", "device", "torch", "native_kernel")  # the run's


def summarize(res: dict[str, dict], batch_size: int, seq_len: int, threads, device) -> dict:
    """The flat JSON object ``pgb bench`` prints: compressed figures, others prefixed.

    ``speedup`` is baseline latency / compressed latency; ``structured_speedup`` is
    baseline latency / structured latency. ``native_kernel``: whether grouped layers could
    use pgb's native CPU kernel (:mod:`pgb.native`) in this process.
    """
    summary = dict(res["compressed"])
    summary.update({"batch_size": batch_size, "seq_len": seq_len, "threads": threads,
                    "device": device, "torch": torch.__version__,
                    "native_kernel": native.available()})
    for k, v in res.get("baseline", {}).items():
        summary[f"baseline_{k}"] = v
    if "baseline" in res:
        summary["speedup"] = res["baseline"]["latency_ms"] / res["compressed"]["latency_ms"]
    if "structured" in res:
        twin = summarize({"compressed": res["structured"],
                          **({"baseline": res["baseline"]} if "baseline" in res else {})},
                         batch_size, seq_len, threads, device)
        summary = with_structured(summary, twin)
    return summary


def with_structured(summary: dict, twin: dict) -> dict:
    """``summary`` with ``twin``'s own figures added as ``structured_*`` (``speedup`` becomes
    ``structured_speedup``); both are one-model objects as :func:`summarize` makes them from
    the same bench run. The result is what a bench run with ``--structured`` prints."""
    own = {k: v for k, v in twin.items()
           if k not in SETTINGS and not k.startswith(("baseline_", "structured_"))}
    return {**summary, **{f"structured_{k}": v for k, v in own.items()}}
