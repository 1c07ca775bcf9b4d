"""``pgb report DIR``: the PNG is written, report.md lists every matrix with its G and the
dropped sublayers, and a folder without report.json gets a clear error."""

from __future__ import annotations

import copy
import json
import re

import pytest
from tiny import random_scores, tiny_model

from pgb.allocation import allocate, retained_importance
from pgb.arch import MATRICES, dims_of
from pgb.checkpoint import save_compact
from pgb.cli import main
from pgb.config import CompressConfig
from pgb.pipeline import search_groupings
from pgb.report import write_report
from pgb.surgery import to_compact

ROW = re.compile(r"^\| (\d+) \| (\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \|$")


def compressed_folder(folder, sparsity: float, weak: tuple[str, ...]):
    """A compact tiny model with the report.json that `pgb compress` writes beside it."""
    model = tiny_model("bert")
    groupings = search_groupings(random_scores(model, seed=1, weak=weak), model,
                                 CompressConfig(sparsity=sparsity), progress=False)
    recipe = allocate(groupings, dims_of(model), "bert", sparsity)
    folder.mkdir()
    save_compact(to_compact(copy.deepcopy(model), recipe), None, folder)
    report = {"method": "pgb", "task": "sst2", "target_sparsity": sparsity,
              "achieved_sparsity": recipe.sparsity(), "params_before": 1000,
              "params_after": 600, "flops_ratio": 0.55,
              "stage_seconds": {"importance": 1.0, "grouping": 0.5},
              "matrices": retained_importance(recipe, groupings),
              "dropped_sublayers": recipe.dropped_sublayers(),
              "teacher_metrics": {"accuracy": 0.9, "samples": 872},
              "metrics": {"accuracy": 0.88, "samples": 872}}
    (folder / "report.json").write_text(json.dumps(report))
    return recipe, report


def table_rows(markdown: str) -> dict[tuple[int, str], tuple[str, float, float]]:
    """(layer, matrix) -> (G or 'dropped', weights kept, importance kept) of report.md."""
    rows = {}
    for line in markdown.splitlines():
        m = ROW.match(line)
        if m:
            rows[(int(m[1]), m[2])] = (m[3], float(m[4]), float(m[5]))
    return rows


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "compressed"
    recipe, report = compressed_folder(folder, 0.6, weak=("1.attn",))
    assert recipe.dropped_sublayers() == ["1.attn"]  # the case worth drawing
    paths = write_report(folder)
    return folder, recipe, report, paths


def test_png_is_written(reported):
    folder, _, _, paths = reported
    png = folder / "report.png"
    assert paths["report_png"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 200 and height > 100


def test_markdown_lists_every_matrix_with_its_groups(reported):
    folder, recipe, report, paths = reported
    assert paths["report_md"] == str(folder / "report.md")
    rows = table_rows((folder / "report.md").read_text())
    layers = dims_of(tiny_model("bert")).layers
    assert set(rows) == {(layer, role) for layer in range(layers) for role in MATRICES}
    retained = {m["name"]: m["retained_importance"] for m in report["matrices"]}
    for p in recipe.sublayers:
        for role, plan in p.matrices.items():
            g, weights, importance = rows[(p.layer, role)]
            if p.dropped:
                assert (g, weights) == ("dropped", 0.0)
            else:
                assert g == str(p.groups)
                assert weights == pytest.approx(len(plan.kept) / p.groups ** 2, abs=5e-4)
                assert importance == pytest.approx(retained[f"{p.layer}.{role}"], abs=5e-4)


def test_markdown_names_the_dropped_sublayers_and_the_sparsity(reported):
    folder, recipe, _, _ = reported
    text = (folder / "report.md").read_text()
    assert "Dropped sublayers: 1.attn." in text
    assert f"achieved {recipe.sparsity():.4f} of encoder linear weights" in text
    assert "| accuracy | 0.9000 | 0.8800 |" in text


def test_no_dropped_sublayer_says_none(tmp_path):
    folder = tmp_path / "compressed"
    recipe, _ = compressed_folder(folder, 0.5, weak=())
    assert recipe.dropped_sublayers() == []
    write_report(folder)
    text = (folder / "report.md").read_text()
    assert "Dropped sublayers: none." in text
    assert all(g != "dropped" for g, _, _ in table_rows(text).values())


def test_speedup_budget_is_stated(tmp_path):
    folder = tmp_path / "compressed"
    _, report = compressed_folder(folder, 0.5, weak=())
    write_report(folder)
    assert "Speed-up budget" not in (folder / "report.md").read_text()
    report.update(target_speedup=2.0, planned_speedup=2.037, speedup_shape=[8, 64])
    (folder / "report.json").write_text(json.dumps(report))
    write_report(folder)
    assert "Speed-up budget 2x at batch 8 x 64: the sparsity above measured 2.04x over the " \
        "teacher while planning." in (folder / "report.md").read_text()


def test_cli_report_prints_the_paths(reported, capsys):
    folder = reported[0]
    assert main(["-q", "report", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"report_md": str(folder / "report.md"),
                   "report_png": str(folder / "report.png")}


def test_folder_without_report_json(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no report.json; pass the output folder"):
        write_report(tmp_path / "model")
    assert main(["-q", "report", str(tmp_path / "model")]) == 2
    assert re.search(r"pgb report: error: .*model has no report.json; pass the output folder "
                     r"of `pgb compress` or `pgb run`", capsys.readouterr().err)
    assert list((tmp_path / "model").iterdir()) == []  # nothing half-written
