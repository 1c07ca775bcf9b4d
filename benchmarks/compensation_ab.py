"""The compensation stage alone, two or more code versions interleaved: seconds, same weights?

Stage timings of whole ``pgb compress`` runs move by 10-30% from run to run on a shared
2-core machine, more than a stage speed-up worth having; this times only the stage, with
the versions alternating, and checks that they compute the same weights.

Each run is a fresh process that imports ``pgb`` from the checkout named by ``--code``
(PYTHONPATH, run outside the repository so that the working tree does not shadow it). It
loads the teacher with its head seeded (a folder without a task head gets the same fresh
head in every run), the task's calibration sample batched by length as ``pgb compress``
does, and a ``recipe.json`` written by an earlier compress, runs ``compensate`` once with
the default settings and reports its seconds and a SHA-256 of the compensated weights.
Each version's weights from its first run are compared with the first version's
(``max_abs_diff_vs_first``, ``max_rel_diff_vs_first``: for changes that move rounding).

Usage:
    python benchmarks/compensation_ab.py --model runs/teachers/mrpc --task mrpc
        --recipe OUT/recipe.json --code before=/path/to/old/checkout --code after=.
        [--reps 3] [--out benchmarks/results/compensation_ab.json]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import copy

    import torch

    import pgb
    from pgb.compensate import apply_masks, compensate
    from pgb.config import CompressConfig
    from pgb.modeling import load_task_model
    from pgb.recipe import Recipe
    from pgb.taskdata import TaskData
    from pgb.tasks import get_task

    torch.manual_seed(0)
    task = get_task(args.task)
    teacher, tok, _ = load_task_model(args.model, task)
    teacher.eval()
    cfg = CompressConfig(sparsity=0.5)  # only the calibration and compensation defaults
    data = TaskData(task, tok, args.data_dir)
    batches = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed,
                               by_length=True)
    recipe = Recipe.load(args.recipe)
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)
    start = time.perf_counter()
    compensate(student, teacher, recipe, batches, cfg.damping, progress=False)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, t in student.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().numpy().tobytes())
    if args.save:
        torch.save(student.state_dict(), args.save)
    print(json.dumps({"seconds": seconds, "weights_sha256": digest.hexdigest(),
                      "pgb_file": pgb.__file__, "threads": torch.get_num_threads()}))


def run_once(args: argparse.Namespace, code: str, save: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve()), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model",
           str(Path(args.model).resolve()), "--task", args.task, "--recipe",
           str(Path(args.recipe).resolve()), "--data-dir", str(Path(args.data_dir).resolve())]
    cmd += ["--save", str(save)] if save else []
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True,
                             text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def weight_differences(saved: dict[str, Path]) -> dict[str, dict]:
    """Per version, how far its compensated weights are from the first version's: the
    largest absolute difference, and the largest over tensors of |difference| / |first|
    (Frobenius norms)."""
    import torch

    first = torch.load(next(iter(saved.values())))
    out = {}
    for label, path in saved.items():
        other = torch.load(path)
        diff = {k: (other[k].double() - w.double()) for k, w in first.items()}
        out[label] = {
            "max_abs_diff_vs_first": max(float(d.abs().max()) for d in diff.values()),
            "max_rel_diff_vs_first": max(float(d.norm() / first[k].double().norm().clamp_min(1e-30))
                                         for k, d in diff.items())}
    return out


def commit_of(code: str) -> str | None:
    return subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--recipe", required=True, help="recipe.json of an earlier pgb compress")
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR", "../shared/data"))
    p.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to import pgb from; give two or more")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compensation_ab.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    codes = dict(c.split("=", 1) for c in args.code)
    if len(codes) < 2:
        p.error("give at least two --code LABEL=PATH")
    runs = {label: [] for label in codes}
    with tempfile.TemporaryDirectory() as tmp:
        saved = {label: Path(tmp) / f"{i}.pt" for i, label in enumerate(codes)}
        for rep in range(args.reps):  # interleaved: a slow spell of the machine hits both
            for label, code in codes.items():
                runs[label].append(run_once(args, code, saved[label] if rep == 0 else None))
                print(json.dumps({"rep": rep, "label": label, **runs[label][-1]}), flush=True)
        diffs = weight_differences(saved)
    digests = {r["weights_sha256"] for rs in runs.values() for r in rs}
    result = {
        "task": args.task, "model": args.model, "recipe": args.recipe,
        "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
        "command": "python benchmarks/compensation_ab.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])),
        "same_weights": len(digests) == 1,
        "versions": [{"label": label, "path": code, "git_commit": commit_of(code),
                      "pgb_file": runs[label][0]["pgb_file"],
                      "seconds": [r["seconds"] for r in runs[label]],
                      "median_seconds": statistics.median(r["seconds"] for r in runs[label]),
                      "weights_sha256": sorted({r["weights_sha256"] for r in runs[label]}),
                      **diffs[label]}
                     for label, code in codes.items()],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({v["label"]: round(v["median_seconds"], 1) for v in result["versions"]}
                     | {"same_weights": result["same_weights"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
