"""Prune + compensate time of MiniLM-L6 (no re-finetuning) with 1,024 calibration samples.

Runs ``pgb compress --no-refinetune`` for each task teacher and sparsity, and records the
seconds per stage from report.json in ``benchmarks/results/compress_time.json`` (+ .md).

Also records the wall-clock seconds of the whole command (model loading, tokenizing the
calibration sample, the dev evaluation included), and can time the other methods beside PGB.

To compare two versions of the code, run it once per version with ``--label`` and
``--append`` into one ``--out`` file: the ``pgb`` it runs is the one Python imports (put
an older checkout first on ``PYTHONPATH``), and each row records that package's path and
git commit.

Usage: python benchmarks/compress_time.py [--tasks sst2,mrpc,stsb,cola] [--sparsities 0.5,0.875]
    [--methods pgb,structured,magnitude] [--keep runs/compress_time] [--label L --append]
    [--note TEXT] [--render]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def code_version() -> dict:
    """The pgb package the ``pgb`` command imports here (PYTHONPATH first) and its commit.

    Asked from outside the repository: ``python -c`` puts the working directory first on
    the path, where the checkout's own ``pgb`` would shadow PYTHONPATH (the console script
    does not)."""
    with tempfile.TemporaryDirectory() as cwd:
        where = subprocess.run([sys.executable, "-c", "import pgb; print(pgb.__file__)"],
                               check=True, capture_output=True, text=True,
                               cwd=cwd).stdout.strip()
    commit = subprocess.run(["git", "-C", str(Path(where).parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"pgb_file": where, "git_commit": commit or None}


def measure(task: str, sparsity: float, method: str, teachers: Path, data_dir: str,
            keep: Path | None) -> dict:
    out = (keep / f"{task}-{method}-s{sparsity}") if keep else Path(tempfile.mkdtemp()) / "out"
    cmd = ["pgb", "-q", "compress", "--model", str(teachers / task), "--task", task,
           "--data-dir", data_dir, "--sparsity", str(sparsity), "--out", str(out),
           "--method", method, "--no-refinetune", "--calib-samples", "1024", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    if not keep:
        shutil.rmtree(out.parent)
    sec = report["stage_seconds"]
    prune = sum(v for k, v in sec.items() if k != "refinetune")
    return {"task": task, "sparsity": sparsity, "method": method, "stage_seconds": sec,
            "prune_compensate_seconds": prune, "command_wall_seconds": wall,
            "achieved_sparsity": report.get("achieved_sparsity"),
            "metrics": report["metrics"], "teacher_metrics": report["teacher_metrics"],
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "date": datetime.date.today().isoformat(), "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sst2,mrpc,stsb,cola")
    p.add_argument("--sparsities", default="0.5,0.875")
    p.add_argument("--teachers", default=str(ROOT / "runs" / "teachers"))
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR", "../shared/data"))
    p.add_argument("--methods", default="pgb", help="of pgb, structured, magnitude")
    p.add_argument("--keep", help="keep the compressed folders under this folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_time.json"))
    p.add_argument("--label", help="a name for this run's rows (e.g. the code version)")
    p.add_argument("--append", action="store_true",
                   help="add the rows to those already in --out instead of replacing them")
    p.add_argument("--note", help="how these rows were made (e.g. the teachers), kept with "
                                  "each row and listed under the table")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write --out's table again (--note goes to the "
                        "rows without one)")
    args = p.parse_args(argv)
    keep = Path(args.keep) if args.keep else None
    out = Path(args.out)
    records = json.loads(out.read_text()) if (args.append or args.render) and out.exists() \
        else []
    version = {"label": args.label, **code_version()}
    if args.render:
        for r in records:  # rows measured without a note take this one
            r["note"] = r.get("note") or args.note
    for task in [] if args.render else args.tasks.split(","):
        for s in (float(v) for v in args.sparsities.split(",")):
            for method in args.methods.split(","):
                records.append({**measure(task, s, method, Path(args.teachers),
                                          args.data_dir, keep), **version, "note": args.note})
                print(json.dumps({k: records[-1][k] for k in (
                    "task", "sparsity", "method", "prune_compensate_seconds",
                    "command_wall_seconds", "metrics")}), flush=True)
    out.write_text(json.dumps(records, indent=2))
    lines = ["# Prune + compensate time, MiniLM-L6, 1,024 calibration samples (generated)", "",
             f"{records[0]['cpu_count']} CPU cores, {records[0]['threads']} torch threads, "
             f"{records[0]['date']}. `stages` lists each stage's seconds; `command` is the "
             "wall clock of the whole `pgb compress` (loading, tokenizing, dev evaluation "
             "included).", "",
             "| task | sparsity | method | code | stages (s) | prune + compensate s | command s |",
             "|---|---:|---|---|---|---:|---:|"]
    for r in records:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items()
                           if k != "refinetune")
        code = r.get("label") or (r.get("git_commit") or "")[:7]
        lines.append(f"| {r['task']} | {r['sparsity']} | {r['method']} | {code} | {stages} | "
                     f"{r['prune_compensate_seconds']:.1f} | {r['command_wall_seconds']:.0f} |")
    notes = list(dict.fromkeys(r["note"] for r in records if r.get("note")))
    lines += [""] + [f"Note: {n}" for n in notes] if notes else []
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
