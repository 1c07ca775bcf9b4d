"""How far the importance and compensation stages sit above the arithmetic they must do.

For each task teacher (``runs/teachers/<task>``) and the calibration sample ``pgb compress``
draws (1,024 examples, batches of 32, seed 0), in one process:

- the two stages as ``pgb.pipeline.compress`` runs them (no re-finetuning, no evaluation);
- the same passes bare: a forward and backward of the same length-cut pieces with the
  gradients of the same 36 matrices (nothing accumulated: the Fisher pass without its
  scores), and two forwards of the by-length batches the compensation runs (the teacher
  and the masked student, without hooks, statistics or solves);
- the matrix-product FLOPs those passes cannot avoid (encoder linear layers, attention
  scores and values; a backward is counted as twice its forward; the compensation adds the
  Gram and cross products of its least squares, block by block, from the recipe), divided
  by the float32 matmul rate measured here at the same shapes: a floor, in seconds, that
  only doing less arithmetic can go under.

Usage: python benchmarks/time_floor.py [--tasks sst2,mrpc,stsb,cola] [--sparsity 0.5]
    [--out benchmarks/results/time_floor.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from compress_time import code_version
from speed import cpu_model

from pgb.arch import MATRICES, dims_of, get_matrix
from pgb.compensate import apply_masks
from pgb.config import CompressConfig
from pgb.flops import dense_flops
from pgb.modeling import load_task_model
from pgb.pieces import each_piece
from pgb.pipeline import compress
from pgb.taskdata import TaskData
from pgb.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def gemm_rate(hidden: int, inter: int, tokens: int, repeats: int = 20) -> float:
    """Median float32 FLOP/s of the encoder's two matmul shapes at ``tokens`` rows."""
    rates = []
    for k, n in ((hidden, inter), (inter, hidden), (hidden, hidden)):
        a, b = torch.randn(tokens, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * tokens * k * n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _width(batch: dict) -> tuple[int, int]:
    return tuple(batch["input_ids"].shape)


def lstsq_flops(recipe, tokens: int, hidden: int, inter: int) -> float:
    """Gram and cross products of the compensation's least squares over ``tokens``."""
    total = 0.0
    for plan in recipe.sublayers:
        if plan.dropped:
            continue
        g = plan.groups
        if plan.kind == "attn":  # Q/K/V share one (H+1)^2 Gram and one cross product
            total += 2 * 2 * tokens * (hidden + 1) ** 2
            wide, narrow, role = hidden // g, hidden // g, "attn_out"
        else:
            total += 2 * 2 * tokens * (hidden + 1) ** 2  # FFN-in: the same two products
            wide, narrow, role = inter // g, hidden // g, "ffn_out"
        blocks = len(plan.matrices[role].kept)
        total += blocks * 2 * tokens * ((wide + 1) ** 2 + narrow * (wide + 1))
    return total


def bare_fisher_pass(model, calib) -> float:
    weights = [get_matrix(model, layer, role).weight
               for layer in range(dims_of(model).layers) for role in MATRICES]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        t0 = time.perf_counter()
        for batch in calib:
            for piece, share, _ in each_piece(batch):
                loss = model(**piece).loss
                torch.autograd.grad(loss * share, weights)
        return time.perf_counter() - t0
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@torch.no_grad()
def bare_forwards(models, batches) -> float:
    t0 = time.perf_counter()
    for model in models:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    return time.perf_counter() - t0


def measure(task_name: str, sparsity: float, data_dir: str) -> dict:
    task = get_task(task_name)
    teacher, tok, _ = load_task_model(str(ROOT / "runs" / "teachers" / task_name), task)
    teacher.eval()
    data = TaskData(task, tok, data_dir, None, 128)
    cfg = CompressConfig(sparsity=sparsity, refinetune=False)
    calib = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed)
    by_length = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed,
                                 by_length=True)
    dims = dims_of(teacher)
    hidden, inter = dims.hidden, dims.intermediate

    result = compress(teacher, tok, task, cfg, data, evaluate_models=False, progress=False)
    stages = result.report["stage_seconds"]
    recipe = result.model.pgb_recipe
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)  # compensation runs the masked dense student

    fisher_bare = bare_fisher_pass(teacher, calib)
    forwards_bare = bare_forwards([teacher, student], by_length)

    pieces = [_width(p) for b in calib for p, _, _ in each_piece(b)]
    fisher_flops = 3 * sum(r * dense_flops(dims, w) for r, w in pieces)
    comp_tokens = sum(int(b["attention_mask"].sum()) for b in by_length)
    comp_flops = 2 * sum(r * dense_flops(dims, w) for r, w in map(_width, by_length)) \
        + lstsq_flops(recipe, comp_tokens, hidden, inter)  # teacher + student, then solves
    piece_tokens = statistics.median(r * w for r, w in pieces)
    rate = gemm_rate(hidden, inter, int(piece_tokens))
    return {
        "task": task_name, "sparsity": sparsity,
        "real_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
        "fisher_tokens_run": sum(r * w for r, w in pieces),
        "compensation_tokens_run": sum(r * w for r, w in map(_width, by_length)),
        "importance_seconds": stages["importance"],
        "importance_bare_seconds": fisher_bare,
        "importance_flops": fisher_flops,
        "compensation_seconds": stages["compensation"],
        "compensation_bare_forwards_seconds": forwards_bare,
        "compensation_flops": comp_flops,
        "gemm_flops_per_second": rate, "gemm_tokens": int(piece_tokens),
        "importance_floor_seconds": fisher_flops / rate,
        "compensation_floor_seconds": comp_flops / rate,
        "grouping_seconds": stages["grouping"],
    }


def table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        "# Importance and compensation against their arithmetic (generated by "
        "`benchmarks/time_floor.py`; do not edit)", "",
        f"MiniLM-L6 task teachers, 1,024 calibration samples, S = {r0['sparsity']}, "
        f"{r0['threads']} threads, {r0['cpu']}, {', '.join(sorted({r['date'] for r in records}))}"
        f", from `{r0['json']}`. "
        "*stage*: as `pgb compress` runs it; *bare*: the same passes without scores, hooks, "
        "statistics or solves (Fisher: forward + backward of the same pieces; compensation: "
        "teacher and masked student forwards of the same batches); *floor*: matrix-product "
        "FLOPs of the passes (plus the least-squares Gram and cross products for the "
        "compensation) divided by the float32 matmul rate measured in the same process "
        "(GFLOP/s column). The grouping search (its own column) is the third stage of "
        "prune + compensate. From commit 9499790 on, compensation takes the teacher's "
        "activations recorded in the Fisher pass (`pgb/trace.py`) and no longer runs the "
        "teacher, whose forward its *bare* and *floor* columns still count.", "",
        "| task | code | real tokens | importance: stage / bare / floor s | compensation: stage / "
        "bare / floor s | both stages s | both floors s | grouping s | GFLOP/s |",
        "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r['task']} | {r.get('label') or (r.get('git_commit') or '')[:7]} | "
            f"{r['real_tokens']:,} | {r['importance_seconds']:.1f} / "
            f"{r['importance_bare_seconds']:.1f} / {r['importance_floor_seconds']:.1f} | "
            f"{r['compensation_seconds']:.1f} / {r['compensation_bare_forwards_seconds']:.1f} / "
            f"{r['compensation_floor_seconds']:.1f} | "
            f"{r['importance_seconds'] + r['compensation_seconds']:.1f} | "
            f"{r['importance_floor_seconds'] + r['compensation_floor_seconds']:.1f} | "
            f"{r['grouping_seconds']:.1f} | {r['gemm_flops_per_second'] / 1e9:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sst2,mrpc,stsb,cola")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR", "../shared/data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_floor.json"))
    p.add_argument("--label", help="a name for this run's rows (e.g. the code version)")
    p.add_argument("--append", action="store_true",
                   help="add the rows to those already in --out instead of replacing them")
    p.add_argument("--md-only", action="store_true",
                   help="only rewrite the markdown table from the rows in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.md_only:
        out.with_suffix(".md").write_text(table(json.loads(out.read_text())))
        return 0
    records = json.loads(out.read_text()) if args.append and out.exists() else []
    version = {"label": args.label, **code_version()}
    for task in args.tasks.split(","):
        rec = measure(task, args.sparsity, args.data_dir)
        rec.update(threads=torch.get_num_threads(), cpu=cpu_model(),
                   date=datetime.date.today().isoformat(), json=str(out.relative_to(ROOT)
                                                                    if out.is_relative_to(ROOT)
                                                                    else out),
                   command="python benchmarks/time_floor.py " + " ".join(argv or sys.argv[1:]))
        records.append({**rec, **version})
        print(json.dumps({k: round(v, 1) if isinstance(v, float) and v < 1e6 else v
                          for k, v in rec.items()}), flush=True)
    out.write_text(json.dumps(records, indent=2))
    out.with_suffix(".md").write_text(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
