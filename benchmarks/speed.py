"""End-to-end speed of compressed models against their dense teacher, in one process.

For each (compressed folder, teacher folder[, structured folder]) triple and each shape,
the models are timed in turn (interleaved) with ``pgb.bench``; the JSON goes to
``benchmarks/results/speed.json`` and a table to ``benchmarks/results/speed.md``.

Usage:
    python benchmarks/speed.py --case NAME COMPRESSED TEACHER [STRUCTURED] [--case ...]
        [--shapes 32x128,1x128] [--threads 2] [--repeats 30] [--reuse-memory] [--rounds R]
        [--compile [BACKEND]] [--native-ab] [--out benchmarks/results/speed.json]

--reuse-memory runs every model under ``pgb.bench.keep_freed_memory()`` (glibc keeps
freed memory, so forwards do not page-fault fresh memory in). --compile times every model
(teacher and structured too) through ``torch.compile``, inductor unless a backend is named.
--native-ab runs every case twice in each round, first with PyTorch's kernels only
(``PGB_NATIVE=0``) then with pgb's native kernel, as cases "NAME torch-kernels" and
"NAME native": an interleaved before/after of the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from pgb import native
from pgb.bench import bench_folders, summarize

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_case(name: str, folders: list[str], shapes: list[tuple[int, int]], threads: int,
             repeats: int, reuse_memory: bool = False, memory: bool = True,
             round_: int = 0, compile_backend: str | None = None) -> list[dict]:
    labels = ["compressed", "baseline", "structured"][:len(folders)]
    out = []
    for batch, seq in shapes:
        res = bench_folders(dict(zip(labels, folders, strict=True)), batch, seq,
                            repeats=repeats, warmup=3, threads=threads, device="cpu",
                            memory=memory, progress=False, reuse_memory=reuse_memory,
                            compile_backend=compile_backend)
        record = summarize(res, batch, seq, threads, "cpu")
        record.update(reuse_memory=reuse_memory, cpu=cpu_model(),
                      compile_backend=compile_backend)
        report = Path(folders[0]) / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            record.update(achieved_sparsity=rep.get("achieved_sparsity"),
                          dropped_sublayers=rep.get("dropped_sublayers"),
                          groups=rep.get("groups"))
        record.update(case=name, folders=folders, round=round_)
        print(json.dumps({k: record[k] for k in ("case", "round", "batch_size", "seq_len",
                                                 "speedup")
                          if k in record}), flush=True)
        out.append(record)
    return out


@contextlib.contextmanager
def native_kernel(enabled: bool | None):
    """Grouped layers with (True) or without (False) the native kernel; None: as set."""
    if enabled is None:
        yield
        return
    before = os.environ.get("PGB_NATIVE")
    os.environ["PGB_NATIVE"] = "1" if enabled else "0"
    native.reset()
    try:
        if enabled and not native.available():
            raise SystemExit(f"--native-ab: no native kernel here ({native.unavailable_reason()})")
        yield
    finally:
        if before is None:
            os.environ.pop("PGB_NATIVE", None)
        else:
            os.environ["PGB_NATIVE"] = before
        native.reset()


def _ratio(values: list[float]) -> str:
    """Median speed-up, then its range when there are several rounds: '2.41x (2.20-2.63)'."""
    med = f"{statistics.median(values):.2f}x"
    return med if len(values) < 2 else f"{med} ({min(values):.2f}-{max(values):.2f})"


def rows(records: list[dict]) -> list[dict]:
    """One row per (case, shape): medians over rounds (speed-up: median of the per-round
    speed-ups, each measured with the models interleaved), sizes from the first round."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["case"], r["batch_size"], r["seq_len"]), []).append(r)
    out = []
    for (case, batch, seq), rs in groups.items():
        row = {"case": case, "batch_size": batch, "seq_len": seq, "rounds": len(rs),
               "sparsity": rs[0].get("achieved_sparsity"),
               "pgb_mib": rs[0]["checkpoint_bytes"] / 2**20,
               "dense_mib": rs[0]["baseline_checkpoint_bytes"] / 2**20}
        for key in ("baseline_latency_ms", "latency_ms", "speedup", "structured_latency_ms",
                    "structured_speedup"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = vals or None
        out.append(row)
    return out


def table(records: list[dict]) -> str:
    lines = ["# End-to-end speed (generated by benchmarks/speed.py; do not edit)", "",
             "| case | batch x seq | sparsity | dense ms | pgb ms | speed-up | structured ms | "
             "structured speed-up | pgb MiB | dense MiB |", "|---|---|---:|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    table_rows = rows(records)
    for r in table_rows:
        s_ms = r["structured_latency_ms"]
        s_cols = ("", "") if s_ms is None else (f"{statistics.median(s_ms):.1f}",
                                                _ratio(r["structured_speedup"]))
        lines.append(
            f"| {r['case']} | {r['batch_size']}x{r['seq_len']} | "
            f"{r['sparsity'] or float('nan'):.3f} | "
            f"{statistics.median(r['baseline_latency_ms']):.1f} | "
            f"{statistics.median(r['latency_ms']):.1f} | "
            f"{_ratio(r['speedup'])} | {s_cols[0]} | {s_cols[1]} | "
            f"{r['pgb_mib']:.1f} | {r['dense_mib']:.1f} |")
    r0 = records[0] if records else {}
    memory = "freed memory kept for reuse (`--reuse-memory`)" if r0.get("reuse_memory") \
        else "glibc's default allocator settings"
    if r0.get("compile_backend"):
        memory += f"; every model run through torch.compile ({r0['compile_backend']})"
    n_rounds = max((r["rounds"] for r in table_rows), default=1)
    spread = "" if n_rounds < 2 else (
        f" {n_rounds} rounds, the cases taken in turn within each round; latencies are "
        "medians over rounds; a speed-up is the median of the per-round speed-ups, its range over "
        "rounds in brackets.")
    lines += ["", f"Threads {r0.get('threads')}, torch {torch.__version__}, "
              f"{r0.get('cpu') or platform.machine()}, {memory}; latency = median of "
              "repeated runs after warm-up, models interleaved in one process." + spread]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", action="append", required=True,
                   metavar="NAME COMPRESSED TEACHER [STRUCTURED]")
    p.add_argument("--shapes", default="32x128,1x128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--reuse-memory", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, in turn, and report medians "
                        "and ranges (this machine's speed drifts over minutes)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time every model through torch.compile (inductor unless named)")
    p.add_argument("--native-ab", action="store_true",
                   help="each case with PyTorch's kernels, then with the native kernel")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    for case in args.case:
        if not 3 <= len(case) <= 4:
            p.error(f"--case takes NAME COMPRESSED TEACHER [STRUCTURED], got {case}")
    variants = [(" torch-kernels", False), (" native", True)] if args.native_ab \
        else [("", None)]
    records = []
    for round_ in range(args.rounds):  # peak memory does not drift: measured once
        for case in args.case:
            for suffix, enabled in variants:
                with native_kernel(enabled):
                    records += run_case(case[0] + suffix, case[1:], shapes, args.threads,
                                        args.repeats, args.reuse_memory, memory=round_ == 0,
                                        round_=round_, compile_backend=args.compile)
    out = Path(args.out)
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(),
                               "command": " ".join(["python", *sys.argv]),
                               "records": records}, indent=2))
    out.with_suffix(".md").write_text(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
