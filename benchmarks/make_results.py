"""Tables and plots of the benchmark campaign, generated from its result JSON files alone.

Reads every ``<results>/*.json`` written by ``benchmarks/campaign.py`` and writes

- ``RESULTS.md``: machine and versions, one table per task (every method, sparsity and
  re-finetuning budget; failed runs appear as "failed" rows), the commands and seeds of
  every row, a "PGB vs baselines" table at equal sparsity and budget, and a dominance check
  (is each structured point matched by a PGB point at least as fast and as accurate?);
- PNG plots: per task the metric against sparsity and against measured speed-up, and the
  prune + compensate time of every method.

A hand-written ``<results>/NOTES.md`` (what the numbers mean, where PGB loses and why),
when present, is included after the summary tables.

Usage: ``python benchmarks/make_results.py [--results DIR] [--out FILE] [--plots DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("pgb", "pgb-shared", "pgb-noperm", "pgb-uniform", "pgb-nocomp", "structured",
         "magnitude")
BASELINES = ("structured", "magnitude")
PRUNE_STAGES = ("importance", "grouping", "compensation")  # "prune + compensate" time
NA = "–"


# ---------------------------------------------------------------- reading records


def load_results(folder: Path) -> list[dict]:
    """Every result record, sorted by name; an unreadable file becomes a failed record."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            record = {"error": f"unreadable result file: {err}"}
        record.setdefault("name", path.stem)
        records.append(record)
    return records


def derive_no_refinetune(records: list[dict]) -> list[dict]:
    """Add a no-re-finetune row for each re-finetuned run that measured its model before
    re-finetuning (``metrics_before_refinetune``), unless a real no-re-finetune run exists.

    The model before re-finetuning is exactly what ``--no-refinetune`` returns (same seed,
    same one-shot stages), so one run gives both rows; its speed is the same structure's.
    """
    have = {(r.get("task"), r.get("variant"), r.get("sparsity")) for r in records
            if not r.get("refinetune") and "error" not in r}
    out = list(records)
    for r in records:
        before = get(r, "report", "metrics_before_refinetune")
        key = (r.get("task"), r.get("variant"), r.get("sparsity"))
        if not r.get("refinetune") or before is None or key in have or "error" in r:
            continue
        rep = dict(r["report"], metrics=before, refinetune_steps=0,
                   stage_seconds={**r["report"].get("stage_seconds", {}), "refinetune": 0.0})
        main = rep.get("main_metric")
        value, teacher = before.get(main), rep.get("teacher_main_value")
        rep.update(main_value=value,
                   ratio_to_teacher=value / teacher if value is not None and teacher else None)
        out.append(dict(r, name=r["name"].replace("-rft", "-nrft"), refinetune=False,
                        report=rep, derived_from=r["name"]))
    return out


def get(record: dict, *keys, default=None):
    """``record[k1][k2]...`` or ``default`` when any level is missing."""
    for key in keys:
        if not isinstance(record, dict) or record.get(key) is None:
            return default
        record = record[key]
    return record


def is_ok(record: dict) -> bool:
    """A run that finished and has its main metric (the ones plotted and compared)."""
    return "error" not in record and get(record, "report", "main_value") is not None


def variant(record: dict) -> str:
    return record.get("variant") or record.get("method") or "?"


def row_key(record: dict) -> tuple:
    v = variant(record)
    rank = ORDER.index(v) if v in ORDER else len(ORDER)
    return rank, v, record.get("sparsity") or 0.0, bool(record.get("refinetune")), record["name"]


def prune_seconds(record: dict) -> float | None:
    """Importance + grouping + compensation seconds (everything but re-finetuning), as if
    the run had been alone: a later budget of a sweep adds the shared stages' seconds."""
    stages = get(record, "report", "stage_seconds")
    if not stages or not any(s in stages for s in PRUNE_STAGES):
        return None
    return sum(stages.get(s) or 0.0 for s in PRUNE_STAGES) + \
        (record.get("shared_prune_seconds") or 0.0)


def percent_of_teacher(record: dict) -> float | None:
    ratio = get(record, "report", "ratio_to_teacher")
    if ratio is None:
        value = get(record, "report", "main_value")
        teacher = get(record, "report", "teacher_main_value")
        ratio = value / teacher if value is not None and teacher else None
    return None if ratio is None else 100.0 * ratio


# ---------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Point:
    """A model on the accuracy / latency plane."""

    name: str
    metric: float
    speedup: float


def dominating(point: Point, candidates: list[Point]) -> Point | None:
    """The most accurate candidate at least as fast AND at least as accurate as ``point``.

    Example: structured (0.80, 2.0x) is dominated by (0.81, 2.1x) but neither by
    (0.82, 1.9x) (slower) nor by (0.79, 3.0x) (less accurate).
    """
    better = [c for c in candidates if c.speedup >= point.speedup and c.metric >= point.metric]
    return max(better, key=lambda c: (c.metric, c.speedup), default=None)


def to_point(record: dict) -> Point | None:
    metric, speedup = get(record, "report", "main_value"), get(record, "bench", "speedup")
    if not is_ok(record) or speedup is None:
        return None
    return Point(record["name"], metric, speedup)


def by_point(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(task, sparsity, refinetune) -> variant -> finished record."""
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if is_ok(r):
            key = (r.get("task"), r.get("sparsity"), bool(r.get("refinetune")))
            table[key][variant(r)] = r
    return table


# ---------------------------------------------------------------- markdown


def fmt(value, spec: str = ".4f", suffix: str = "") -> str:
    if value is None or isinstance(value, str):
        return NA if value is None else value
    return f"{value:{spec}}{suffix}"


def yes_no(a: float | None, b: float | None) -> str:
    return NA if a is None or b is None else ("yes" if a >= b else "no")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def task_row(r: dict, main: str) -> list[str]:
    head = [variant(r), fmt(r.get("sparsity"), "g"), "yes" if r.get("refinetune") else "no"]
    if "error" in r:
        return head + ["failed", NA, r["error"][:120].replace("\n", " ")] + [NA] * 8
    rep, bench = r.get("report") or {}, r.get("bench") or {}
    others = ", ".join(f"{k} {v:.4f}" for k, v in (rep.get("metrics") or {}).items()
                       if k not in (main, "samples") and isinstance(v, (int, float)))
    params = rep.get("params_after", bench.get("params"))
    ckpt = bench.get("checkpoint_bytes")
    return head + [
        fmt(rep.get("main_value")), fmt(percent_of_teacher(r), ".1f", "%"), others or NA,
        fmt(rep.get("achieved_sparsity"), ".3f"), fmt(params and params / 1e6, ".2f"),
        fmt(rep.get("flops_ratio"), ".3f"), fmt(bench.get("speedup"), ".2f", "×"),
        fmt(ckpt and ckpt / 2**20, ".1f"), fmt(prune_seconds(r), ".0f"),
        fmt(get(rep, "stage_seconds", "refinetune"), ".0f"),
        fmt(len(rep["dropped_sublayers"]) if "dropped_sublayers" in rep else None, "d")]


def task_section(task: str, records: list[dict]) -> list[str]:
    ok = [r for r in records if is_ok(r)]
    main = get(ok[0], "report", "main_metric") if ok else None
    main = main or next((get(r, "report", "main_metric") for r in records
                         if get(r, "report", "main_metric")), "metric")
    lines = [f"## {task}", ""]
    if ok:
        base_ckpt = get(ok[0], "bench", "baseline_checkpoint_bytes")
        lines += [f"Teacher: {main} = {teacher_values(ok)}, params "
                  f"{fmt((get(ok[0], 'report', 'params_before') or 0) / 1e6, '.2f')} M, "
                  f"checkpoint {fmt(base_ckpt and base_ckpt / 2**20, '.1f')} MiB.", ""]
    header = ["method", "sparsity", "re-ft", main, "% teacher", "other metrics",
              "achieved sparsity", "params (M)", "encoder FLOPs ratio", "speed-up",
              "checkpoint MiB", "prune+comp s", "re-ft s", "dropped sublayers"]
    lines += md_table(header, [task_row(r, main) for r in sorted(records, key=row_key)])
    return lines + ["", *commands_section(sorted(records, key=row_key)), ""]


def teacher_values(records: list[dict]) -> str:
    """The teacher's main metric; when rows were made with different teachers (one
    fine-tuned again), each value with the sparsities of its rows (% teacher is always
    against the row's own teacher)."""
    by_value: dict = defaultdict(set)
    for r in records:
        by_value[get(r, "report", "teacher_main_value")].add(r.get("sparsity"))
    if len(by_value) == 1:
        return fmt(next(iter(by_value)))
    parts = [f"{fmt(v)} (rows at S = {', '.join(fmt(s, 'g') for s in sorted(ss, key=float))})"
             for v, ss in sorted(by_value.items(), key=lambda kv: min(kv[1], key=float))]
    return (" and ".join(parts) + " (different teachers; each row's % teacher is against "
            "its own)")


def commands_section(records: list[dict]) -> list[str]:
    lines = ["<details><summary>Commands and seeds</summary>", ""]
    for r in records:
        cmds = "; ".join(f"`{c}`" for c in r.get("commands") or []) or NA
        lines.append(f"- **{r['name']}** (seed {r.get('seed', NA)}): {cmds}")
    return lines + ["", "</details>"]


def summary_section(records: list[dict]) -> list[str]:
    """PGB against each baseline at equal task, sparsity and re-finetuning budget."""
    rows = []
    for (task, sparsity, rft), found in sorted(by_point(records).items(), key=_point_order):
        pgb = get(found.get("pgb", {}), "report", "main_value")
        row = [task, fmt(sparsity, "g"), "yes" if rft else "no", fmt(pgb)]
        for base in BASELINES:
            value = get(found.get(base, {}), "report", "main_value")
            row += [fmt(value), yes_no(pgb, value)]
        row += [fmt(get(found.get("pgb", {}), "bench", "speedup"), ".2f", "×"),
                fmt(get(found.get("pgb", {}), "bench", "structured_speedup"), ".2f", "×")]
        rows.append(row)
    header = ["task", "sparsity", "re-ft", "PGB", "structured", "PGB >= structured?",
              "magnitude", "PGB >= magnitude?", "PGB speed-up",
              "structured speed-up (same bench process)"]
    return ["## PGB vs baselines", "",
            "Main metric of each task at equal sparsity and re-finetuning budget.", "",
            *md_table(header, rows), ""]


def _point_order(item) -> tuple:
    (task, sparsity, rft), _ = item
    return str(task), sparsity or 0.0, rft


def dominance_rows(records: list[dict]) -> list[list[str]]:
    """Per structured point: the PGB point (same task and budget) that dominates it, if any."""
    pgb: dict[tuple, list[Point]] = defaultdict(list)
    for r in records:
        if variant(r) == "pgb" and (p := to_point(r)):
            pgb[(r.get("task"), bool(r.get("refinetune")))].append(p)
    rows = []
    for r in sorted(records, key=lambda r: (str(r.get("task")), row_key(r))):
        point = to_point(r) if variant(r) == "structured" else None
        if point is None:
            continue
        best = dominating(point, pgb[(r.get("task"), bool(r.get("refinetune")))])
        verdict = NA if best is None else f"{best.name} ({best.metric:.4f}, {best.speedup:.2f}×)"
        rows.append([str(r.get("task")), fmt(r.get("sparsity"), "g"),
                     "yes" if r.get("refinetune") else "no", fmt(point.metric),
                     fmt(point.speedup, ".2f", "×"), "yes" if best else "no", verdict])
    return rows


def dominance_section(records: list[dict]) -> list[str]:
    header = ["task", "sparsity", "re-ft", "structured metric", "structured speed-up",
              "dominated by PGB?", "by (metric, speed-up)"]
    return ["## Dominance over structured pruning", "",
            "A structured point is dominated when a PGB point of the same task and "
            "re-finetuning budget (any sparsity) is at least as fast and at least as "
            "accurate; each speed-up is the one measured in that run's own bench.", "",
            *md_table(header, dominance_rows(records)), ""]


def machine_section(records: list[dict]) -> list[str]:
    """Distinct software versions and bench settings found in the records."""
    versions = {json.dumps(r["versions"], sort_keys=True) for r in records if r.get("versions")}
    keys = ("device", "threads", "batch_size", "seq_len", "torch")
    benches = {tuple(get(r, "bench", k) for k in keys) for r in records if r.get("bench")}
    dates = sorted(r["date"] for r in records if r.get("date"))
    lines = ["## Machine and versions", ""]
    for v in sorted(versions):
        lines.append("- versions: " + ", ".join(f"{k} {val}" for k, val in json.loads(v).items()))
    for b in sorted(benches, key=str):
        lines.append("- bench: " + ", ".join(f"{k} {val}" for k, val in zip(keys, b, strict=True)))
    loads = [get(r, "loadavg_before_bench", default=[None])[0] for r in records]
    loads = [x for x in loads if x is not None]
    if loads:
        lines.append(f"- 1-min load average before bench: median {statistics.median(loads):.2f},"
                     f" max {max(loads):.2f} (timings on a busy machine are noisier)")
    if dates:
        lines.append(f"- runs dated {dates[0]} to {dates[-1]}")
    walls: dict[str, float] = defaultdict(float)
    for r in records:
        if r.get("wall_seconds") is not None and not r.get("derived_from"):
            walls[str(r.get("task"))] += float(r["wall_seconds"])
    if walls:
        per_task = ", ".join(f"{t} {hours(w)}" for t, w in sorted(walls.items()))
        lines.append(f"- wall time of the runs (`wall_seconds`, compress + bench, summed): "
                     f"{hours(sum(walls.values()))} ({per_task})")
    files = [r for r in records if not r.get("derived_from")]
    derived = len(records) - len(files)
    n_failed = sum(not is_ok(r) for r in files)
    lines.append(f"- {len(files)} result files, {n_failed} failed"
                 + (f"; {derived} no-re-finetuning rows derived from them" if derived else ""))
    return lines + [""]


def hours(seconds: float) -> str:
    """``1 h 05 min``, or ``42 min`` under an hour."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def render(records: list[dict], source: str = "benchmarks/results/campaign",
           notes: str = "") -> str:
    """RESULTS.md; ``notes`` (the reading of the numbers, kept beside the results in
    ``<results>/NOTES.md``) goes after the summary tables."""
    tasks: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        tasks[str(r.get("task") or "unknown")].append(r)
    lines = ["# Benchmark campaign results", "",
             "_Generated by `python benchmarks/make_results.py` from the JSON files in "
             f"`{source}/`. Do not edit by hand: edit the script and re-run it._", "",
             *machine_section(records), *summary_section(records),
             *dominance_section(records)]
    if notes.strip():
        lines += ["## Notes", "", notes.strip(), ""]
    for task in sorted(tasks):
        lines += task_section(task, tasks[task])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots


def _series(records: list[dict], x_of) -> dict[tuple[str, bool], list[tuple[float, float]]]:
    """(variant, refinetune) -> sorted (x, metric) of finished runs with an x value."""
    out: dict[tuple[str, bool], list] = defaultdict(list)
    for r in records:
        x = x_of(r)
        if is_ok(r) and x is not None:
            out[(variant(r), bool(r.get("refinetune")))].append((x, r["report"]["main_value"]))
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: row_key(
        {"variant": kv[0][0], "refinetune": kv[0][1], "name": ""}))}


def _metric_plot(plt, task: str, records: list[dict], x_of, xlabel: str, path: Path) -> bool:
    series = _series(records, x_of)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(v for v, _ in series))}
    for (v, rft), pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", color=colors[v], linestyle="-" if rft else "--",
                label=f"{v} ({'re-ft' if rft else 'no re-ft'})")
    teacher = next((get(r, "report", "teacher_main_value") for r in records if is_ok(r)), None)
    if teacher is not None:
        ax.axhline(teacher, color="grey", linestyle=":", label="teacher")
    main = next(get(r, "report", "main_metric") for r in records if is_ok(r))
    ax.set(xlabel=xlabel, ylabel=main, title=task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _time_plot(plt, records: list[dict], path: Path) -> bool:
    """Mean prune + compensate seconds per method, grouped by task."""
    secs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        if is_ok(r) and (s := prune_seconds(r)) is not None:
            secs[(str(r.get("task")), variant(r))].append(s)
    if not secs:
        return False
    tasks = sorted({t for t, _ in secs})
    variants = sorted({v for _, v in secs}, key=lambda v: row_key({"variant": v, "name": ""}))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(tasks)), 4.4))
    for i, v in enumerate(variants):
        heights = [statistics.mean(secs.get((t, v), [0.0])) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], heights, width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set(ylabel="prune + compensate seconds (mean)", title="compression time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def make_plots(records: list[dict], folder: Path) -> list[Path]:
    """Write the PNG plots; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pgb[plot]'): no plots", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = sorted({str(r.get("task")) for r in records if is_ok(r)})
    for task in tasks:
        rs = [r for r in records if str(r.get("task")) == task]
        for stem, x_of, xlabel in (
                ("sparsity", lambda r: r.get("sparsity"), "target sparsity"),
                ("speedup", lambda r: get(r, "bench", "speedup"), "measured speed-up (×)")):
            path = folder / f"{task}_metric_vs_{stem}.png"
            if _metric_plot(plt, task, rs, x_of, xlabel, path):
                written.append(path)
    if _time_plot(plt, records, folder / "compression_time.png"):
        written.append(folder / "compression_time.png")
    return written


def _show(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "campaign"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--plots", default=str(ROOT / "benchmarks" / "plots"))
    args = p.parse_args(argv)
    records = derive_no_refinetune(load_results(Path(args.results)))
    if not records:
        print(f"error: no result JSON files in {args.results}; run benchmarks/campaign.py "
              "first", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    notes_file = Path(args.results) / "NOTES.md"
    notes = notes_file.read_text() if notes_file.is_file() else ""
    Path(args.out).write_text(render(records, _show(Path(args.results)), notes))
    plots = make_plots(records, Path(args.plots))
    print(f"{args.out}: {len(records)} runs; {len(plots)} plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
