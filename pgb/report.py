"""``pgb report DIR``: a readable report.md and a picture of where the model was cut.

The picture is a grid, one row per encoder layer and one column per matrix; each cell
shows the group count G and the fraction of the matrix's importance kept, coloured by the
fraction of its weights kept; dropped sublayers are marked "dropped".

For a sparsity sweep's folder (``sweep.json``) every budget gets its own report, and DIR
gets report.md with one row per budget and report.png, the dev metrics against sparsity.
"""

from __future__ import annotations

import json
from pathlib import Path

from .arch import MATRICES

NEEDS = ("report.json",)


def _load(folder: Path) -> tuple[dict, dict | None]:
    if not (folder / "report.json").is_file():
        raise FileNotFoundError(f"{folder} has no report.json; pass the output folder of "
                                "`pgb compress` or `pgb run`")
    report = json.loads((folder / "report.json").read_text())
    recipe = folder / "recipe.json"
    return report, json.loads(recipe.read_text()) if recipe.is_file() else None


def _cells(report: dict, recipe: dict | None) -> dict[tuple[int, str], dict]:
    """(layer, role) -> {groups, kept (fraction of weights), retained, dropped}."""
    cells = {}
    for m in report.get("matrices", []):
        layer, role = m["name"].split(".")
        g = m.get("groups", 1)
        kept = m.get("kept_blocks", g) / (g * g) if g else 0.0
        cells[(int(layer), role)] = {"groups": g, "kept": kept, "dropped": False,
                                     "retained": m.get("retained_importance", float("nan"))}
    for name in report.get("dropped_sublayers", []):
        layer, kind = name.split(".")
        roles = MATRICES[:4] if kind == "attn" else MATRICES[4:]
        for role in roles:
            cells.setdefault((int(layer), role), {"groups": 0, "retained": 0.0})
            cells[(int(layer), role)].update({"kept": 0.0, "dropped": True})
    return cells


def plot(cells: dict, path: Path, title: str) -> None:
    """The layer x matrix grid as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = 1 + max((k[0] for k in cells), default=0)
    grid = np.full((layers, len(MATRICES)), np.nan)
    fig, ax = plt.subplots(figsize=(1.5 * len(MATRICES) + 1, 0.55 * layers + 1.5))
    for (layer, role), c in cells.items():
        j = MATRICES.index(role)
        grid[layer, j] = c["kept"]
        text = "dropped" if c["dropped"] else f"G={c['groups']}\n{c['retained']:.0%} imp."
        ax.text(j, layer, text, ha="center", va="center", fontsize=8)
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(MATRICES)), MATRICES)
    ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of weights kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict, cells: dict, png: str) -> str:
    lines = [f"# pgb report: {report.get('task', '?')}, method {report.get('method', 'pgb')}",
             "", f"![where the model was cut]({png})", "", "| | teacher | compressed |",
             "|---|---:|---:|"]
    t, m = report.get("teacher_metrics", {}), report.get("metrics", {})
    lines += [f"| {k} | {t[k]:.4f} | {m[k]:.4f} |" for k in _metric_names(report)]
    lines += [f"| parameters | {report.get('params_before')} | {report.get('params_after')} |",
              f"| encoder FLOPs ratio (seq 128) | 1.0 | {report.get('flops_ratio', 0):.3f} |",
              "", f"Target sparsity {report.get('target_sparsity')}, achieved "
              f"{report.get('achieved_sparsity', 0):.4f} of encoder linear weights.",
              *_speedup_line(report),
              f"Dropped sublayers: {', '.join(report.get('dropped_sublayers', [])) or 'none'}.",
              "", "Seconds per stage: " + ", ".join(
                  f"{k} {v:.1f}" for k, v in report.get("stage_seconds", {}).items()), "",
              "| layer | matrix | G | weights kept | importance kept |", "|---|---|---:|---:|---:|"]
    for (layer, role), c in sorted(cells.items(), key=lambda kv: (kv[0][0],
                                                                  MATRICES.index(kv[0][1]))):
        g = "dropped" if c["dropped"] else c["groups"]
        lines.append(f"| {layer} | {role} | {g} | {c['kept']:.3f} | {c['retained']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path) -> dict:
    """Write ``report.md`` and ``report.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        return write_sweep_report(folder)
    report, recipe = _load(folder)
    cells = _cells(report, recipe)
    png = folder / "report.png"
    plot(cells, png, f"{report.get('task', '')}: sparsity "
                     f"{report.get('achieved_sparsity', 0):.3f}, {report.get('method', 'pgb')}")
    md = folder / "report.md"
    md.write_text(_markdown(report, cells, png.name))
    return {"report_md": str(md), "report_png": str(png)}


def _speedup_line(report: dict) -> list[str]:
    if report.get("target_speedup") is None:
        return []
    batch, seq = report.get("speedup_shape", ["?", "?"])
    return [f"Speed-up budget {report['target_speedup']:g}x at batch {batch} x {seq}: the "
            f"sparsity above measured {report.get('planned_speedup', 0):.2f}x over the "
            f"teacher while planning."]


def _metric_names(report: dict) -> list[str]:
    teacher, metrics = report.get("teacher_metrics", {}), report.get("metrics", {})
    return [k for k in teacher if k in metrics and k != "samples"]


def _sweep_markdown(reports: list[dict], names: list[str], png: str) -> str:
    first = reports[0]
    metrics = _metric_names(first)
    teacher = first.get("teacher_metrics", {})
    lines = [f"# pgb sweep: {first.get('task', '?')}, method {first.get('method', 'pgb')}",
             "", f"![dev metrics against sparsity]({png})", "",
             "Teacher: " + ", ".join(f"{k} {teacher[k]:.4f}" for k in metrics) + ".", "",
             "| folder | sparsity | achieved | parameters | FLOPs ratio (seq 128) | "
             + " | ".join(f"{k} (% of teacher)" for k in metrics)
             + " | prune + compensate s | re-finetune s |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(metrics) + "---:|---:|"]
    for name, r in zip(names, reports, strict=True):
        sec = r.get("stage_seconds", {})
        cells = [f"{r['metrics'][k]:.4f} ({100 * r['metrics'][k] / teacher[k]:.1f}%)"
                 if teacher.get(k) else f"{r['metrics'][k]:.4f}" for k in metrics]
        lines.append(f"| [{name}]({name}/report.md) | {r.get('target_sparsity')} | "
                     f"{r.get('achieved_sparsity', 0):.4f} | {r.get('params_after')} | "
                     f"{r.get('flops_ratio', 0):.3f} | " + " | ".join(cells) + " | "
                     f"{sum(v for k, v in sec.items() if k != 'refinetune'):.1f} | "
                     f"{sec.get('refinetune', 0):.1f} |")
    lines += ["", "Seconds are each budget's own: the importance scores and grouping searches "
              "ran once, in the first budget, and the others reused them."]
    return "\n".join(lines) + "\n"


def _plot_sweep(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metric_names(reports[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.get("target_sparsity") for r in reports]
    for k in metrics:
        line, = ax.plot(xs, [r["metrics"][k] for r in reports], marker="o", label=k)
        ax.axhline(reports[0]["teacher_metrics"][k], color=line.get_color(), linestyle="--",
                   linewidth=0.8, label=f"{k}, teacher")
    ax.set_xlabel("sparsity (encoder linear weights removed)")
    ax.set_ylabel("dev metric")
    ax.set_title(f"{reports[0].get('task', '')}: {reports[0].get('method', 'pgb')}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_report(folder: Path) -> dict:
    """A report in every budget's folder, and one across budgets in ``folder``."""
    sweep = json.loads((folder / "sweep.json").read_text())
    names = sweep["folders"]
    reports = [_load(folder / name)[0] for name in names]
    budgets = [write_report(folder / name) for name in names]
    png, md = folder / "report.png", folder / "report.md"
    _plot_sweep(reports, png)
    md.write_text(_sweep_markdown(reports, names, png.name))
    return {"report_md": str(md), "report_png": str(png), "budgets": budgets}
