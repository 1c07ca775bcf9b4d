"""Retained importance of pruning patterns at equal kept weights, on a tuned teacher.

PGB's own objective (the share of the mean-scaled diagonal Fisher kept, summed over the
matrices of a sublayer, as the allocator sees it) measured for several ways of keeping
1/G of every matrix of every sublayer:

- ``unstructured``: the top 1/G weights of each matrix (an upper bound);
- ``pgb``: the G diagonal blocks of ``pgb.grouping.search_sublayer`` with the inner
  partition shared by the sublayer's matrices (what ``pgb compress`` searches);
- ``pgb-per-matrix``: the same search run on each matrix alone (METHOD.md's G per matrix;
  pgb shares the inner partition for speed, see docs/DESIGN.md);
- ``contiguous``: G diagonal blocks without permutation (``--no-permutation``);
- ``units``: 1/G of the inner units (attention heads, FFN neurons) kept whole, the
  pattern of the structured baseline, units ranked by their summed scores (attention only
  where G divides the head count);
- ``units+pgbM``: M/G of the units kept, then grouped into M diagonal blocks (a hybrid
  that no pgb method implements; attention only where the kept dims split into M bands).

Writes ``--json`` and ``--md``. Usage (2 threads; MiniLM-L6 about a minute per task, the
Fisher pass of a base-size model about 4 minutes)::

    python benchmarks/pattern_retained.py --task mrpc --model runs/teachers/mrpc \\
        --task stsb --model runs/teachers/stsb --groups 2,4,8,12 \\
        --json benchmarks/results/design/pattern_retained/pattern_retained.json \\
        --md benchmarks/results/design/pattern_retained/pattern_retained.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def unit_rank(oriented: dict[str, np.ndarray], unit: int) -> np.ndarray:
    """Inner units (``unit`` consecutive inner indices each) by summed score, best first."""
    rows = sum(s.sum(axis=1) for s in oriented.values())
    return np.argsort(-rows.reshape(-1, unit).sum(axis=1), kind="stable")


def kept_units(oriented: dict[str, np.ndarray], unit: int, count: int) -> np.ndarray:
    """Inner indices of the ``count`` best units, ascending."""
    best = np.sort(unit_rank(oriented, unit)[:count])
    return (best[:, None] * unit + np.arange(unit)).ravel()


def patterns(oriented: dict[str, np.ndarray], g: int, heads: int | None,
             head_size: int | None, fixed_head_order: bool = False) -> dict[str, float | None]:
    """Kept share of the sublayer's summed scores for each pattern at 1/G of the weights;
    None where a pattern does not fit the sublayer's sizes. ``fixed_head_order``: heads
    may not move between bands (MPNet's relative position bias), as in ``pgb compress``."""
    from pgb.grouping import search_sublayer

    total = sum(float(s.sum()) for s in oriented.values())
    n = next(iter(oriented.values())).shape[0]
    out: dict[str, float | None] = {}
    out["unstructured"] = sum(float(np.sort(s.ravel())[::-1][:s.size // g].sum())
                              for s in oriented.values()) / total
    fixed = {"heads": heads, "fixed_head_order": fixed_head_order}
    out["pgb"] = search_sublayer(oriented, g, **fixed).retained()
    per = [search_sublayer({r: s}, g, **fixed) for r, s in oriented.items()]
    out["pgb-per-matrix"] = sum(sum(float(b.sum()) for b in p.block_scores.values())
                                for p in per) / total
    out["contiguous"] = search_sublayer(oriented, g, **fixed, permute=False).retained()
    unit = head_size if heads else 1
    units = heads if heads else n
    for m in (1, 2, 4):
        name = "units" if m == 1 else f"units+pgb{m}"
        count = units * m // g
        if m > g or (units * m) % g or count == 0 or count == units:
            out[name] = None
            continue
        keep = kept_units(oriented, unit, count)
        sub = {r: s[keep] for r, s in oriented.items()}
        if m == 1:
            out[name] = sum(float(s.sum()) for s in sub.values()) / total
            continue
        h = next(iter(sub.values())).shape[1]
        if len(keep) % m or h % m:
            out[name] = None
            continue
        # a hypothetical pattern: the kept heads are grouped in any order
        out[name] = search_sublayer(sub, m, heads=count if heads else None).retained() * \
            sum(float(s.sum()) for s in sub.values()) / total
    return out


def measure(task_name: str, model_dir: str, data_dir: str, groups: list[int],
            calib: int, seed: int) -> dict:
    from pgb.arch import SUBLAYERS, dims_of, get_arch
    from pgb.config import CompressConfig
    from pgb.grouping import orient
    from pgb.modeling import load_task_model
    from pgb.pipeline import _scores
    from pgb.taskdata import TaskData
    from pgb.tasks import get_task

    task = get_task(task_name)
    teacher, tok, _ = load_task_model(model_dir, task)
    # compensate=False: the scores alone, without recording the teacher's activations
    cfg = CompressConfig(sparsity=0.5, calib_samples=calib, seed=seed, compensate=False)
    data = TaskData(task, tok, data_dir)
    batches = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed)
    start = time.perf_counter()
    scores, _ = _scores(teacher, batches, cfg, progress=False)  # mean-scaled, as compress
    fisher_s = time.perf_counter() - start
    d, fixed = dims_of(teacher), get_arch(teacher).fixed_head_order
    rows = []
    for layer in range(d.layers):
        for kind in SUBLAYERS:
            oriented = {r: orient(r, scores[f"{layer}.{r}"].numpy()) for r in SUBLAYERS[kind]}
            heads = d.heads if kind == "attn" else None
            mass = sum(float(s.sum()) for s in oriented.values())
            for g in groups:
                share = patterns(oriented, g, heads, d.hidden // d.heads if heads else None,
                                 fixed)
                rows.append({"layer": layer, "kind": kind, "groups": g, "mass": mass,
                             "retained": share})
                print(json.dumps(rows[-1]), flush=True)
    return {"task": task_name, "model": model_dir, "calib_samples": calib, "seed": seed,
            "fisher_seconds": fisher_s, "rows": rows}


def summary(result: dict) -> list[dict]:
    """Mass-weighted kept share per (kind or all, G, pattern), over sublayers where the
    pattern fits every sublayer of that kind."""
    out = []
    names = list(result["rows"][0]["retained"])
    for g in sorted({r["groups"] for r in result["rows"]}):
        for kind in ("attn", "ffn", "all"):
            rows = [r for r in result["rows"] if r["groups"] == g
                    and (kind == "all" or r["kind"] == kind)]
            line = {"task": result["task"], "groups": g, "kind": kind}
            for name in names:
                if any(r["retained"][name] is None for r in rows):
                    line[name] = None
                    continue
                line[name] = sum(r["retained"][name] * r["mass"] for r in rows) / \
                    sum(r["mass"] for r in rows)
            out.append(line)
    return out


def markdown(results: list[dict], meta: dict) -> str:
    names = list(results[0]["rows"][0]["retained"])
    lines = ["# Retained importance by pruning pattern, at 1/G of every matrix (generated)",
             "",
             f"{meta['date']}, `{meta['command']}`. Mean-scaled diagonal Fisher of the "
             f"teacher on {results[0]['calib_samples']} calibration examples (seed "
             f"{results[0]['seed']}); each cell is the share of the scores kept, weighted "
             "by each sublayer's score mass (all patterns keep the same weight count); "
             "'-' where the pattern does not fit (heads not divisible).", "",
             "| task | G (kept 1/G) | sublayers | " + " | ".join(names) + " |",
             "|---|---:|---|" + "---:|" * len(names)]
    for res in results:
        for line in summary(res):
            cells = ["-" if line[n] is None else f"{line[n]:.3f}" for n in names]
            lines.append(f"| {line['task']} | {line['groups']} | {line['kind']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--groups", default="2,8")
    p.add_argument("--calib-samples", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    args = p.parse_args()
    if len(args.task) != len(args.model):
        p.error("give one --model per --task")
    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    groups = [int(g) for g in args.groups.split(",")]
    results = [measure(t, m, args.data_dir, groups, args.calib_samples, args.seed)
               for t, m in zip(args.task, args.model, strict=True)]
    meta = {"date": datetime.date.today().isoformat(),
            "command": "python benchmarks/pattern_retained.py " + " ".join(
                f"--task {t} --model {m}" for t, m in zip(args.task, args.model, strict=True))
            + f" --groups {args.groups}", "threads": args.threads}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results,
                                           "summary": [s for r in results
                                                       for s in summary(r)]}, indent=1))
    Path(args.md).write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
