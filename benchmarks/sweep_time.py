"""Time of a sparsity sweep (``--sparsity 0.5,0.75,0.875``) against one run per budget.

For each task and method: the separate ``pgb compress --no-refinetune`` runs (timed by
``compress_time.measure``), then one sweep command over the same budgets; records the
prune + compensate seconds (sum of stages over the budgets) and the wall clock of the
commands, and whether every budget's dev metrics match, in
``benchmarks/results/sweep_time.json`` (+ .md).

Usage: python benchmarks/sweep_time.py [--tasks mrpc] [--sparsities 0.5,0.75,0.875]
    [--methods pgb,structured]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_time import ROOT, measure  # noqa: E402


def _prune_seconds(stage_seconds: dict) -> float:
    return sum(v for k, v in stage_seconds.items() if k != "refinetune")


def measure_sweep(task: str, sparsities: list[float], method: str, teachers: Path,
                  data_dir: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "sweep"
    cmd = ["pgb", "-q", "compress", "--model", str(teachers / task), "--task", task,
           "--data-dir", data_dir, "--sparsity", ",".join(str(s) for s in sparsities),
           "--out", str(out), "--method", method, "--no-refinetune", "--calib-samples", "1024"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    record = json.loads((out / "sweep.json").read_text())
    shutil.rmtree(out.parent)
    budgets = [{"sparsity": s["target_sparsity"], "stage_seconds": s["stage_seconds"],
                "metrics": s["metrics"]} for s in record["sweep"]]
    return {"command": " ".join(cmd), "command_wall_seconds": wall, "budgets": budgets,
            "prune_compensate_seconds": sum(_prune_seconds(b["stage_seconds"])
                                            for b in budgets)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="mrpc")
    p.add_argument("--sparsities", default="0.5,0.75,0.875")
    p.add_argument("--methods", default="pgb,structured")
    p.add_argument("--teachers", default=str(ROOT / "runs" / "teachers"))
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR", "../shared/data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_time.json"))
    args = p.parse_args(argv)
    sparsities = [float(v) for v in args.sparsities.split(",")]
    records = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            separate = [measure(task, s, method, Path(args.teachers), args.data_dir, None)
                        for s in sparsities]
            sweep = measure_sweep(task, sparsities, method, Path(args.teachers),
                                  args.data_dir)
            same = all(b["metrics"] == r["metrics"]
                       for b, r in zip(sweep["budgets"], separate, strict=True))
            records.append({
                "task": task, "method": method, "sparsities": sparsities,
                "separate": {"prune_compensate_seconds": sum(r["prune_compensate_seconds"]
                                                             for r in separate),
                             "command_wall_seconds": sum(r["command_wall_seconds"]
                                                         for r in separate),
                             "runs": separate},
                "sweep": sweep, "same_metrics": same, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat()})
            r = records[-1]
            print(json.dumps({"task": task, "method": method, "same_metrics": same,
                              "separate_s": round(r["separate"]["prune_compensate_seconds"], 1),
                              "sweep_s": round(sweep["prune_compensate_seconds"], 1)}),
                  flush=True)
    Path(args.out).write_text(json.dumps(records, indent=2))
    lines = ["# A sparsity sweep against one run per budget, MiniLM-L6, 1,024 calibration "
             "samples (generated)", "",
             f"{records[0]['cpu_count']} CPU cores, {records[0]['threads']} torch threads, "
             f"{records[0]['date']}; no re-finetuning. `prune + compensate` sums the stage "
             "seconds over the budgets; `commands` is the wall clock of the commands (model "
             "loading, tokenizing and dev evaluation included). `same metrics`: every "
             "budget of the sweep scored what its separate run scored.", "",
             "| task | method | budgets | prune + compensate s: separate / sweep | "
             "commands s: separate / sweep | same metrics |", "|---|---|---|---|---|---|"]
    for r in records:
        sep, sw = r["separate"], r["sweep"]
        lines.append(f"| {r['task']} | {r['method']} | "
                     f"{', '.join(str(s) for s in r['sparsities'])} | "
                     f"{sep['prune_compensate_seconds']:.1f} / "
                     f"{sw['prune_compensate_seconds']:.1f} | "
                     f"{sep['command_wall_seconds']:.0f} / {sw['command_wall_seconds']:.0f} | "
                     f"{'yes' if r['same_metrics'] else 'no'} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
