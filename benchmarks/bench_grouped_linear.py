"""Benchmark GroupedLinear against the dense nn.Linear it replaces (CPU).

For every case (shape, groups G, tokens, index-map variant) the dense layer and the
grouped layer run interleaved, `--reps` times after `--warmup` rounds, under
``torch.inference_mode()``; the record keeps medians and quartiles. Outputs:
``benchmarks/results/grouped_linear.json`` (one record per case) and a markdown table
generated from it (``--md-only`` regenerates the table from an existing JSON).

Conditions that move CPU timings a lot, handled here and written into the JSON:
- Other processes: before each case the script waits (up to ``--max-wait`` s) until
  the machine is idle, records the CPU share that other processes used while the case
  ran (``others_cpu``: 0 is a clean measurement, 1 is one core fully taken; with 2
  threads on 2 cores a busy core stalls every OpenMP barrier), and measures the case
  again, up to ``--attempts`` times, while that share is above 0.1.
- glibc malloc: a large freed tensor is returned to the kernel (heap trim / munmap), so
  the next one of that size page-faults on every 4 KiB page (~6,000 faults, +1-4 ms
  for a 4096 x 1536 fp32 output), depending on allocation history, for dense and
  grouped alike. By default the script sets ``M_MMAP_MAX=0`` and a 1 GiB
  ``M_TRIM_THRESHOLD`` (what a caching allocator such as jemalloc gives); pass
  ``--no-malloc-tuning`` to measure without it. Page faults per call are recorded.
- Sharing the cores: with 2 threads on 2 cores that other jobs keep busy, every OpenMP
  barrier waits for a scheduler slice (each op then takes a multiple of ~8 ms here).
  Running under ``chrt -f 5`` (SCHED_FIFO, as root) gives the benchmark the cores; the
  policy is recorded. Memory bandwidth and caches stay shared, so compare runs through
  the recorded ``fill_GBps`` probe.

Usage: ``python benchmarks/bench_grouped_linear.py [--threads 2] [--quick]``, or
``chrt -f 5 python benchmarks/bench_grouped_linear.py --max-wait 0`` on a busy machine.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pgb.grouped_linear import STRATEGIES, GroupedLinear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MINILM = [(384, 1536), (1536, 384), (384, 384)]  # FFN up, FFN down, attention
BERT_BASE = [(768, 3072), (3072, 768)]
HIDDEN = (384, 768)  # residual-stream widths: sides that may need a gather / scatter
MIN_WINDOW_S = 0.5  # shortest timed window per case
TARGET_SHAPES = {(384, 1536), (1536, 384)}  # the 80%-of-ideal target, 4,096 tokens, G 2/4/8


def cases(quick: bool, tokens: list[int], target_only: bool = False) -> list[dict]:
    """Every (shape, G, tokens, variant) to measure; with target_only, only the kernel
    target's cases (its shapes, G = 2, 4, 8, no index maps) at each token count."""
    if target_only:
        return [{"in": in_f, "out": out_f, "G": g, "tokens": n, "variant": "none"}
                for n in tokens for in_f, out_f in sorted(TARGET_SHAPES) for g in (2, 4, 8)]
    out = []
    for n in tokens:
        for in_f, out_f in MINILM:
            for g in (2, 4, 8) if quick else (2, 3, 4, 6, 8, 12, 16):
                out.append({"in": in_f, "out": out_f, "G": g, "tokens": n, "variant": "none"})
            for g in (2, 4, 8):
                if in_f in HIDDEN:
                    out.append({"in": in_f, "out": out_f, "G": g, "tokens": n,
                                "variant": "gather"})
                if out_f in HIDDEN:
                    out.append({"in": in_f, "out": out_f, "G": g, "tokens": n,
                                "variant": "scatter"})
                if in_f in HIDDEN and out_f in HIDDEN:
                    out.append({"in": in_f, "out": out_f, "G": g, "tokens": n,
                                "variant": "gather+scatter"})
        if not quick:
            for in_f, out_f in BERT_BASE:
                for g in (2, 8):
                    out.append({"in": in_f, "out": out_f, "G": g, "tokens": n,
                                "variant": "none"})
    return out


def tune_malloc() -> str:
    """Keep freed heap memory mapped (see module docstring). Returns a description."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    if libc.mallopt(m_mmap_max, 0) != 1 or libc.mallopt(m_trim_threshold, 1 << 30) != 1:
        raise RuntimeError("mallopt failed; rerun with --no-malloc-tuning")
    return "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB"


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine spent busy since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Sleep until other processes use < threshold cores; return the last share seen."""
    deadline = time.time() + max_wait
    while True:
        b0 = busy_cpu_s()
        time.sleep(0.5)
        share = (busy_cpu_s() - b0) / 0.5
        if share < threshold or time.time() > deadline:
            return share
        time.sleep(2.0)


def make_layers(case: dict, seed: int = 0) -> tuple[nn.Linear, GroupedLinear]:
    """A GroupedLinear (all blocks kept) and the dense nn.Linear equal to it."""
    g = torch.Generator().manual_seed(seed)
    in_f, out_f, groups = case["in"], case["out"], case["G"]
    gather = case["variant"] in ("gather", "gather+scatter")
    scatter = case["variant"] in ("scatter", "gather+scatter")
    torch.manual_seed(seed)
    grouped = GroupedLinear(in_f, out_f, groups, list(range(groups)),
                            in_index=torch.randperm(in_f, generator=g) if gather else None,
                            out_index=torch.randperm(out_f, generator=g) if scatter else None)
    dense = nn.Linear(in_f, out_f)
    w, b = grouped.to_dense()
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(b)
    return dense.requires_grad_(False), grouped.requires_grad_(False)


def time_pair(dense: nn.Module, grouped: nn.Module, x: torch.Tensor, reps: int,
              warmup: int) -> dict:
    """Interleaved timings (ms) of both layers, the others' CPU share and page faults."""
    times: dict[str, list[float]] = {"dense": [], "grouped": []}
    faults = 0
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(warmup):
            dense(x)
            grouped(x)
        # small cases run more often: steadier medians, and a window long enough for
        # the 10 ms resolution of /proc/stat behind others_cpu
        pair_s = (time.perf_counter() - start) / max(warmup, 1)
        reps = max(reps, min(2000, math.ceil(MIN_WINDOW_S / max(pair_s, 1e-6))))
        b0, c0, w0 = busy_cpu_s(), own_cpu_s(), time.time()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(reps):
            for name, layer in (("dense", dense), ("grouped", grouped)):
                start = time.perf_counter()
                layer(x)
                times[name].append((time.perf_counter() - start) * 1e3)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        b1, c1, w1 = busy_cpu_s(), own_cpu_s(), time.time()
    others = ((b1 - b0) - (c1 - c0)) / max(w1 - w0, 1e-9)  # cores used by other processes
    out = {"others_cpu": round(max(others, 0.0), 3), "faults_per_call": faults / (2 * reps),
           "reps": reps}
    for name, values in times.items():
        q1, med, q3 = statistics.quantiles(values, n=4)
        out[f"{name}_ms"], out[f"{name}_iqr_ms"] = med, q3 - q1
    return out


def run_case(case: dict, args: argparse.Namespace, meta: dict) -> dict:
    """Measure one case and return its JSON record."""
    dense, grouped = make_layers(case)
    grouped.strategy = args.strategy
    x = torch.randn(case["tokens"], case["in"])
    with torch.inference_mode():
        err = (grouped(x) - dense(x)).abs().max().item()
        strategy = grouped.pick_strategy(x)
    if err > 1e-3:
        raise AssertionError(f"grouped != dense for {case}: max abs error {err}")
    attempt = 0
    while True:  # measure again while other processes took CPU time
        attempt += 1
        busy_before = wait_until_idle(args.max_wait)
        t = time_pair(dense, grouped, x, args.reps, args.warmup)
        if t["others_cpu"] < 0.1 or attempt >= args.attempts:
            break
    speedup = t["dense_ms"] / t["grouped_ms"]
    return {
        "shape": f"{case['in']}->{case['out']}", "in_features": case["in"],
        "out_features": case["out"], "G": case["G"], "tokens": case["tokens"],
        "variant": case["variant"], "threads": args.threads,
        "dense_ms": round(t["dense_ms"], 4), "grouped_ms": round(t["grouped_ms"], 4),
        "dense_iqr_ms": round(t["dense_iqr_ms"], 4),
        "grouped_iqr_ms": round(t["grouped_iqr_ms"], 4),
        "speedup": round(speedup, 3), "ideal_speedup": case["G"],
        "efficiency": round(speedup / case["G"], 3), "strategy": strategy,
        "reps": t["reps"], "max_abs_err": err, "attempts": attempt,
        "others_cpu_before": round(busy_before, 3), "others_cpu": t["others_cpu"],
        "faults_per_call": t["faults_per_call"], **meta,
    }


def fill_bandwidth_gbps(mib: int = 24, reps: int = 15) -> float:
    """Write bandwidth seen by fill_ on a buffer larger than L2: memory-bound kernels
    (the bias pass, wide outputs at high G) slow down when other tenants load memory."""
    buf = torch.empty(mib * 2**18)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.fill_(1.0)
        times.append(time.perf_counter() - start)
    return round(mib / 1024 / statistics.median(times), 1)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# Alternatives measured while choosing the kernels (exploratory scripts, not this file):
# 2 threads, fp32, 4,096 tokens unless said, medians, mostly on a quiet machine.
LOST = """\
## Alternatives that measured slower (exploration, before these runs)

384->1536 at 4,096 tokens, dense 13.8-14.3 ms, reference "bands"-style kernel with a
separate bias add: G=8 3.0-3.1 ms, G=4 4.8-5.0 ms.

- per-block `torch.addmm(bias_b, x_b, W_b, out=band)`: G8 3.7 ms, G4 5.4 ms (addmm
  copies the bias into the output, then the GEMM reads it back with beta=1).
- bias as an extra K row (ones column on the input): G8 3.1-3.3 ms; the (N, G, ib+1)
  input copy alone costs 0.45-0.6 ms.
- output pre-filled with the bias, then `addmm_` (beta=1): G8 3.3 ms.
- tokens in L2-sized chunks (256-2,048) with the bias added in cache: G8 2.8-3.5 ms vs
  2.8 unchunked (more calls, smaller GEMMs).
- bmm into (G, N, ob) + transposing bias add ("batched") at 4,096 tokens: G8 3.6 ms;
  it wins at <= 256 tokens, so "auto" keeps it there.
- `baddbmm` + transpose + reshape: G8 4.2 ms.
- Python loop of `torch.mm(out=band)` vs one `torch.bmm(out=strided bands)`: G8 4.3 vs
  3.9 ms (the same MKL calls, less dispatch).
- `F.linear` per block + `torch.cat` (1536->384): G8 2.9 ms vs 2.3 ms.
- oneDNN `torch.ops.mkldnn._linear_pointwise` per block (prepacked weights) + cat
  (1536->384): G8 4.4 (3.9) ms vs 2.3 ms; strided inputs get copied.
- MKL packed `torch.ops.mkl._mkl_linear` per block, contiguous inputs: G8 3.1 ms vs
  2.5 ms for plain mm.
- `einsum` at 128 tokens: G8 0.129 ms vs 0.091 ms.
- weight stored (G, ob, ib) and used transposed: equal at 4,096 tokens, 5-12% slower at
  128 tokens.

Column gather of a 4,096 x 384 fp32 input (plain copy 0.23-0.26 ms): `index_select`
0.72-0.83 ms (used), `x[:, idx]` 2.0, `torch.gather` 1.55, `take_along_dim` 3.9,
transpose copy + row gather 2.1, one `index_select` per block 1.6, numpy `take` 1.2,
matmul with a permutation matrix 4.3. Concatenating contiguous runs costs 0.45 ms only
when the permutation has long runs (e.g. whole heads), so it is not used.
"""


def _row(r: dict, base: dict) -> str:
    """One markdown table row; `base` maps (shape, G, tokens) to the no-index-map time."""
    mark = ("met" if r["efficiency"] >= 0.8 else "missed") if _in_target(r) else ""
    plain = base.get((r["shape"], r["G"], r["tokens"]))
    extra = f"+{r['grouped_ms'] - plain:.3f}" if r["variant"] != "none" and plain else ""
    return (f"| {r['shape']} | {r['G']} | {r['variant']} | {r['strategy']} "
            f"| {r['dense_ms']:.3f} | {r['grouped_ms']:.3f} | {extra} | {r['speedup']:.2f} "
            f"| {r['efficiency']:.3f} | {mark} | {r['others_cpu']:.2f} |")


def _in_target(r: dict) -> bool:
    return ((r["in_features"], r["out_features"]) in TARGET_SHAPES and r["G"] in (2, 4, 8)
            and r["variant"] == "none" and r["tokens"] == 4096)


def _rounds_table(rows: list[dict]) -> list[str]:
    """The kernel target's cases over rounds: efficiency in each round and the median."""
    keys = sorted({(r["shape"], r["G"]) for r in rows if _in_target(r)})
    rounds = sorted({r.get("round", 1) for r in rows})
    lines = ["## Target cases over rounds (4,096 tokens)", "",
             "Each round measures every case once (dense and grouped interleaved); "
             "efficiency per round, then the median over rounds.", "",
             "| shape | G | strategy | " + " | ".join(f"round {k}" for k in rounds)
             + " | median | target (median) |",
             "|---|---:|---|" + "---:|" * len(rounds) + "---:|---|"]
    for shape, g in keys:
        mine = [r for r in rows if _in_target(r) and (r["shape"], r["G"]) == (shape, g)]
        effs = [r["efficiency"] for r in sorted(mine, key=lambda r: r.get("round", 1))]
        med = statistics.median(effs)
        strategies = "/".join(sorted({r["strategy"] for r in mine}))
        lines.append(f"| {shape} | {g} | {strategies} | "
                     + " | ".join(f"{e:.3f}" for e in effs)
                     + f" | {med:.3f} | {'met' if med >= 0.8 else 'missed'} |")
    return lines + [""]


def write_markdown(data: dict, path: Path, source: Path) -> None:
    """The results table, generated from the JSON file ``source``."""
    meta, rows = data["meta"], data["records"]
    base = {(r["shape"], r["G"], r["tokens"]): r["grouped_ms"]
            for r in rows if r["variant"] == "none"}
    lines = [
        "# GroupedLinear vs dense nn.Linear (CPU)", "",
        f"Generated from `{source.parent.name}/{source.name}` by "
        f"`benchmarks/bench_grouped_linear.py`. torch {meta['torch']}, {meta['threads']} "
        f"threads, {meta['cpu']}, {meta['date']}. Scheduler: {meta['scheduler']}. "
        f"Allocator: {meta['allocator']}. Memory "
        f"write bandwidth (fill_, 24 MiB): {meta['fill_GBps_start']} GB/s at the start, "
        f"{meta['fill_GBps_end']} GB/s at the end.", "",
        f"Note: {meta.get('note', '')}", "",
        f"Median of >= {meta['reps']} interleaved runs (at least {MIN_WINDOW_S} s of runs "
        f"per case) after {meta['warmup']} warm-up rounds, `torch.inference_mode()`. "
        "efficiency = speedup / G. target: efficiency >= 0.80 for 384->1536 and "
        "1536->384 at 4,096 tokens, G = 2, 4, 8, no index maps. index maps: extra ms of "
        "the gather (in_index) and/or scatter (out_index) over the same layer without. "
        "others: CPU cores other processes used during the case.", "",
    ]
    if meta.get("rounds", 1) > 1:
        lines += _rounds_table(rows)
    for tokens in sorted({r["tokens"] for r in rows}, reverse=True):
        lines += [f"## {tokens} tokens", "",
                  "| shape | G | variant | strategy | dense ms | grouped ms | index maps ms "
                  "| speedup | efficiency | target | others |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
        lines += [_row(r, base) for r in rows if r["tokens"] == tokens]
        lines.append("")
    path.write_text("\n".join(lines) + "\n" + LOST)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--reps", type=int, default=21, help="timed runs per layer (>= 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 128])
    p.add_argument("--quick", action="store_true", help="G 2/4/8 only, no BERT-base")
    p.add_argument("--target-only", action="store_true",
                   help="only the kernel target's cases (384->1536, 1536->384, G 2/4/8)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, round after round; the table "
                        "then gives each target case's efficiency per round and the median")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="GroupedLinear kernel (default: auto, as in the models)")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds to wait for an idle machine before each case")
    p.add_argument("--attempts", type=int, default=3,
                   help="measure a case again (up to this many times) when others used CPU")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as is")
    p.add_argument("--note", default="", help="free text stored in the JSON")
    p.add_argument("--json", type=Path, default=RESULTS / "grouped_linear.json")
    p.add_argument("--md", type=Path, default=RESULTS / "grouped_linear.md")
    p.add_argument("--md-only", action="store_true", help="only regenerate --md from --json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.md_only:
        write_markdown(json.loads(args.json.read_text()), args.md, args.json)
        return 0
    torch.set_num_threads(args.threads)
    allocator = "glibc default" if args.no_malloc_tuning else tune_malloc()
    policy = {os.SCHED_OTHER: "SCHED_OTHER (normal)", os.SCHED_FIFO: "SCHED_FIFO (chrt -f)",
              os.SCHED_RR: "SCHED_RR (chrt -r)"}.get(os.sched_getscheduler(0), "other")
    meta = {"torch": torch.__version__, "cpu": cpu_model(), "threads": args.threads,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "allocator": allocator, "scheduler": policy}
    fill_start = fill_bandwidth_gbps()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    records = []
    todo = [(rnd, case) for rnd in range(1, args.rounds + 1)
            for case in cases(args.quick, args.tokens, args.target_only)]
    for i, (rnd, case) in enumerate(todo):
        rec = run_case(case, args, {k: meta[k] for k in ("torch", "cpu", "date")})
        rec["round"] = rnd
        records.append(rec)
        print(f"[{i + 1}] r{rnd} {rec['shape']:>10} G{rec['G']:<2} n={rec['tokens']:<5} "
              f"{rec['variant']:<14} {rec['strategy']:<4} dense {rec['dense_ms']:8.3f} "
              f"grouped {rec['grouped_ms']:8.3f} x{rec['speedup']:5.2f} "
              f"eff {rec['efficiency']:.2f} others {rec['others_cpu']:.2f}", flush=True)
    quality = statistics.median(
        (r["dense_iqr_ms"] / r["dense_ms"] + r["grouped_iqr_ms"] / r["grouped_ms"]) / 2
        for r in records)
    meta |= {"reps": args.reps, "warmup": args.warmup, "note": args.note, "rounds": args.rounds,
             "fill_GBps_start": fill_start, "fill_GBps_end": fill_bandwidth_gbps(),
             "median_relative_iqr": round(quality, 4),
             "mean_others_cpu": round(statistics.mean(r["others_cpu"] for r in records), 3)}
    data = {"meta": meta, "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, args.md, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
