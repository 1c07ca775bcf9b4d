"""Prune + compensate time of MiniLM-L6 (no re-finetuning) with 1,024 calibration samples.

Runs ``pgb compress --no-refinetune`` for each task teacher and sparsity, and records the
seconds per stage from report.json in ``benchmarks/results/compress_time.json`` (+ .md).

Usage: python benchmarks/compress_time.py [--tasks sst2,mrpc,stsb,cola] [--sparsities 0.5,0.875]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(task: str, sparsity: float, teachers: Path, data_dir: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "out"
    cmd = ["pgb", "-q", "compress", "--model", str(teachers / task), "--task", task,
           "--data-dir", data_dir, "--sparsity", str(sparsity), "--out", str(out),
           "--no-refinetune", "--calib-samples", "1024"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out.parent)
    sec = report["stage_seconds"]
    prune = sec["importance"] + sec["grouping"] + sec["compensation"]
    return {"task": task, "sparsity": sparsity, "stage_seconds": sec,
            "prune_compensate_seconds": prune, "metrics": report["metrics"],
            "teacher_metrics": report["teacher_metrics"], "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sst2,mrpc,stsb,cola")
    p.add_argument("--sparsities", default="0.5,0.875")
    p.add_argument("--teachers", default=str(ROOT / "runs" / "teachers"))
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR", "../shared/data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_time.json"))
    args = p.parse_args(argv)
    records = []
    for task in args.tasks.split(","):
        for s in (float(v) for v in args.sparsities.split(",")):
            records.append(measure(task, s, Path(args.teachers), args.data_dir))
            print(json.dumps({k: records[-1][k] for k in ("task", "sparsity",
                                                          "prune_compensate_seconds")}))
    Path(args.out).write_text(json.dumps(records, indent=2))
    lines = ["# Prune + compensate time, MiniLM-L6, 1,024 calibration samples (generated)", "",
             "| task | sparsity | importance s | grouping s | compensation s | total s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['sparsity']} | {r['stage_seconds']['importance']:.1f} | "
              f"{r['stage_seconds']['grouping']:.1f} | {r['stage_seconds']['compensation']:.1f} "
              f"| {r['prune_compensate_seconds']:.1f} |" for r in records]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
