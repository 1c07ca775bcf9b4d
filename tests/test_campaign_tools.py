"""The benchmark campaign tools: the runner's commands, skipping and records (with a fake
CLI), and the tables/plots built from synthetic result files. No training, no models."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


campaign = _load("campaign")
make_results = _load("make_results")


# ---------------------------------------------------------------- make_results

MAIN = {"mrpc": ("accuracy", "f1"), "stsb": ("spearman", "pearson")}


def result(task: str, variant: str, sparsity: float, metric: float, speedup: float,
           teacher: float = 0.8, rft: bool = True) -> dict:
    """A synthetic campaign record; params, sizes and seconds fixed to known values."""
    main, other = MAIN[task]
    rft_tag = "rft" if rft else "nrft"
    return {
        "name": f"minilm-{task}-{variant}-s{sparsity:g}-{rft_tag}", "model": "minilm",
        "task": task, "method": variant.split("-")[0], "variant": variant,
        "sparsity": sparsity, "refinetune": rft, "seed": 0,
        "commands": [f"pgb -q compress --task {task} --sparsity {sparsity:g}",
                     "pgb -q bench --batch-size 32"],
        "versions": {"pgb": "0.1.0", "torch": "2.13.0+cpu"},
        "report": {"achieved_sparsity": sparsity, "params_before": 22_700_000,
                   "params_after": 17_400_000, "flops_ratio": 1 - sparsity,
                   "stage_seconds": {"importance": 10.0, "grouping": 20.0,
                                     "compensation": 30.0, "refinetune": 100.0},
                   "dropped_sublayers": ["0.attn", "3.ffn"],
                   "teacher_metrics": {main: teacher, other: 0.9, "samples": 408},
                   "metrics": {main: metric, other: 0.85, "samples": 408},
                   "main_metric": main, "main_value": metric, "teacher_main_value": teacher,
                   "ratio_to_teacher": metric / teacher},
        "bench": {"speedup": speedup, "checkpoint_bytes": 40 * 2**20, "device": "cpu",
                  "threads": 2, "batch_size": 32, "seq_len": 128, "torch": "2.13.0+cpu",
                  "baseline_checkpoint_bytes": 87 * 2**20},
        "loadavg_before_bench": [1.5, 1.0, 1.0], "date": "2025-01-01T00:00:00+00:00",
        "wall_seconds": 170.0,
    }


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """Two tasks x three methods x two sparsities; magnitude at 0.75 on MRPC failed."""
    folder = tmp_path / "results"
    folder.mkdir()
    metrics = {  # (task, variant) -> metric at 0.5, 0.75; speed-ups 1.8 and 2.5 for all
        ("mrpc", "pgb"): (0.76, 0.72), ("mrpc", "structured"): (0.74, 0.73),
        ("mrpc", "magnitude"): (0.70, None),
        ("stsb", "pgb"): (0.85, 0.80), ("stsb", "structured"): (0.86, 0.70),
        ("stsb", "magnitude"): (0.84, 0.60),
    }
    for (task, variant), values in metrics.items():
        for sparsity, value, speedup in zip((0.5, 0.75), values, (1.8, 2.5), strict=True):
            record = result(task, variant, sparsity, value or 0.0, speedup)
            if value is None:
                record = {k: record[k] for k in ("name", "task", "method", "variant",
                                                 "sparsity", "refinetune", "seed", "commands")}
                record.update(error="RunFailed: `pgb -q compress` exited with status 1",
                              stderr_tail="Traceback ...")
            (folder / f"{record['name']}.json").write_text(json.dumps(record))
    return folder


def test_results_md_rows_and_percent_of_teacher(results_dir, tmp_path):
    out, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    assert make_results.main(["--results", str(results_dir), "--out", str(out),
                              "--plots", str(plots)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmark campaign results")
    assert "Do not edit by hand" in text
    # 0.76 / 0.80 = 95.0 %; prune+comp = 10 + 20 + 30; params 17.4 M; 40 MiB; 2 dropped
    assert ("| pgb | 0.5 | yes | 0.7600 | 95.0% | f1 0.8500 | 0.500 | 17.40 | 0.500 | 1.80× | "
            "40.0 | 60 | 100 | 2 |") in text
    assert "| structured | 0.75 | yes | 0.7300 | 91.2% |" in text
    assert "| magnitude | 0.75 | yes | failed | – | RunFailed:" in text
    assert "| pgb | 0.75 | yes | 0.8000 | 100.0% | pearson 0.8500 |" in text  # stsb
    assert "- versions: pgb 0.1.0, torch 2.13.0+cpu" in text
    assert "- bench: device cpu, threads 2, batch_size 32, seq_len 128" in text
    assert "12 result files, 1 failed" in text
    # 11 finished runs of 170 s (the failed one records none; derived rows are not runs)
    assert "wall time of the runs (`wall_seconds`, compress + bench, summed): 31 min " \
           "(mrpc 14 min, stsb 17 min)" in text
    assert make_results.hours(3725) == "1 h 02 min"
    assert "- **minilm-mrpc-pgb-s0.5-rft** (seed 0): `pgb -q compress --task mrpc" in text


def test_rows_with_different_teachers_name_each(results_dir):
    records = make_results.load_results(results_dir)
    text = make_results.render(records)
    assert "Teacher: accuracy = 0.8000, params" in text  # one teacher: one value
    retrained = result("mrpc", "pgb", 0.875, 0.7, 3.0, teacher=0.82)
    (results_dir / f"{retrained['name']}.json").write_text(json.dumps(retrained))
    text = make_results.render(make_results.load_results(results_dir))
    assert ("Teacher: accuracy = 0.8000 (rows at S = 0.5, 0.75) and 0.8200 (rows at "
            "S = 0.875) (different teachers") in text
    assert "| pgb | 0.875 | yes | 0.7000 | 85.4% |" in text  # 0.70 / 0.82, its own teacher


def test_pgb_vs_baselines_table(results_dir):
    text = make_results.render(make_results.load_results(results_dir))
    # PGB 0.76 vs structured 0.74 (yes) and magnitude 0.70 (yes); at 0.75 magnitude failed
    assert "| mrpc | 0.5 | yes | 0.7600 | 0.7400 | yes | 0.7000 | yes | 1.80× |" in text
    assert "| mrpc | 0.75 | yes | 0.7200 | 0.7300 | no | – | – | 2.50× |" in text
    assert "| stsb | 0.5 | yes | 0.8500 | 0.8600 | no | 0.8400 | yes |" in text


def test_dominance_known_answer():
    P = make_results.Point
    structured = P("s", 0.80, 2.0)
    candidates = [P("slower", 0.82, 1.9), P("worse", 0.79, 3.0), P("both", 0.81, 2.1),
                  P("equal", 0.80, 2.0)]
    assert make_results.dominating(structured, candidates) == P("both", 0.81, 2.1)
    assert make_results.dominating(structured, [P("equal", 0.80, 2.0)]) == P("equal", 0.80, 2.0)
    assert make_results.dominating(structured, candidates[:2]) is None
    assert make_results.dominating(P("s", 0.9, 1.0), candidates) is None


def test_dominance_rows_from_records(results_dir):
    rows = make_results.dominance_rows(make_results.load_results(results_dir))
    verdicts = {(r[0], r[1]): r[5] for r in rows}
    # mrpc structured (0.74, 1.8x) <- pgb (0.76, 1.8x); (0.73, 2.5x): pgb 0.72 at 2.5x is worse
    # stsb structured (0.86, 1.8x): no pgb point reaches 0.86; (0.70, 2.5x) <- pgb (0.80, 2.5x)
    assert verdicts == {("mrpc", "0.5"): "yes", ("mrpc", "0.75"): "no",
                        ("stsb", "0.5"): "no", ("stsb", "0.75"): "yes"}
    assert rows[0][6] == "minilm-mrpc-pgb-s0.5-rft (0.7600, 1.80×)"


def test_plots_are_pngs(results_dir, tmp_path):
    pytest.importorskip("matplotlib")
    written = make_results.make_plots(make_results.load_results(results_dir), tmp_path / "p")
    names = sorted(p.name for p in written)
    assert names == ["compression_time.png", "mrpc_metric_vs_sparsity.png",
                     "mrpc_metric_vs_speedup.png", "stsb_metric_vs_sparsity.png",
                     "stsb_metric_vs_speedup.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_robust_to_missing_fields_and_unreadable_files(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bare.json").write_text(json.dumps({"name": "bare", "task": "mrpc"}))
    partial = result("mrpc", "pgb", 0.5, 0.7, 1.5)
    del partial["bench"], partial["report"]["stage_seconds"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    records = make_results.load_results(tmp_path)
    text = make_results.render(records)
    assert "| pgb | 0.5 | yes | 0.7000 | 87.5% |" in text
    assert "unreadable result file" in text
    assert "3 result files, 2 failed" in text
    assert make_results.make_plots(records, tmp_path / "p")[0].name == \
        "mrpc_metric_vs_sparsity.png"  # no speed-up or time plot without bench/seconds


# ---------------------------------------------------------------- campaign: dry run


def dry(capsys, tmp_path: Path, *extra: str) -> list[str]:
    teachers = tmp_path / "teachers"
    (teachers / "mrpc").mkdir(parents=True, exist_ok=True)
    argv = ["--tasks", "mrpc", "--sparsities", "0.5", "--teachers", str(teachers),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            "--data-dir", str(tmp_path / "data"), "--dry-run", *extra]
    assert campaign.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_run_name_pattern():
    assert campaign.Run("minilm", "sst2", 0.875, "pgb", True).name == "minilm-sst2-pgb-s0.875-rft"
    assert campaign.Run("minilm", "cola", 0.5, "magnitude", False).name == \
        "minilm-cola-magnitude-s0.5-nrft"


def test_dry_run_prints_exact_commands(capsys, tmp_path):
    lines = dry(capsys, tmp_path, "--methods", "pgb,pgb-noperm,magnitude,structured",
                "--refinetune", "both")
    t, r, d = tmp_path / "teachers" / "mrpc", tmp_path / "runs", str(tmp_path / "data")
    names = [line[2:] for line in lines[1:] if line.startswith("# minilm-")]
    assert lines[-1].startswith("# projected: unknown (no runs on record like these in ")
    assert names == [f"minilm-mrpc-{v}-s0.5-{rft}" for rft in ("nrft", "rft")
                     for v in ("structured", "magnitude", "pgb", "pgb-noperm")]
    cmds = {(c[2], c[c.index("--out" if c[2] == "compress" else "--model") + 1]): c
            for c in (shlex.split(line) for line in lines if line.startswith("pgb "))}
    assert len(cmds) == 8 + 2  # a compress per run, a bench per task and re-finetuning

    def compress(name, *flags):
        return ["pgb", "-q", "compress", "--model", str(t), "--task", "mrpc", "--data-dir", d,
                "--sparsity", "0.5", "--out", str(r / name), *flags]

    def bench(rft):  # all the task's models against the teacher, in one process
        models = [x for v in ("structured", "magnitude", "pgb", "pgb-noperm")
                  for x in ("--model", str(r / f"minilm-mrpc-{v}-s0.5-{rft}"))]
        return ["pgb", "-q", "bench", *models, "--baseline", str(t),
                "--batch-size", "32", "--seq-len", "128", "--threads", "2"]

    pgb = "minilm-mrpc-pgb-s0.5-rft"
    cache = ("--teacher-cache", str(r / "teacher-cache"))  # re-finetuning runs share it
    assert cmds[("compress", str(r / pgb))] == compress(pgb, *cache)
    name = "minilm-mrpc-pgb-noperm-s0.5-nrft"
    assert cmds[("compress", str(r / name))] == compress(name, "--no-permutation",
                                                         "--no-refinetune")
    name = "minilm-mrpc-magnitude-s0.5-rft"
    assert cmds[("compress", str(r / name))] == compress(name, "--method", "magnitude", *cache)
    for rft in ("nrft", "rft"):
        assert cmds[("bench", str(r / f"minilm-mrpc-structured-s0.5-{rft}"))] == bench(rft)
    name = "minilm-mrpc-structured-s0.5-nrft"
    assert cmds[("compress", str(r / name))] == compress(name, "--method", "structured",
                                                         "--no-refinetune")


def test_dry_run_variant_flags_and_bench_settings(capsys, tmp_path):
    lines = dry(capsys, tmp_path, "--methods", "pgb-uniform,pgb-nocomp", "--refinetune", "yes",
                "--bench-batch", "8", "--bench-seq", "64", "--bench-threads", "1",
                "--seed", "3", "--compress-args", "--calib-samples 16", "--no-teacher-cache")
    compress = [shlex.split(x) for x in lines if x.startswith("pgb -q compress")]
    assert [c[c.index("--out") + 2:] for c in compress] == [
        ["--uniform-groups", "--seed", "3", "--calib-samples", "16"],
        ["--no-compensation", "--seed", "3", "--calib-samples", "16"]]
    cached = dry(capsys, tmp_path, "--methods", "pgb", "--refinetune", "both",
                 "--teacher-cache", str(tmp_path / "tc"))
    assert [c[c.index("--out") + 2:] for c in map(shlex.split, cached)
            if c[:3] == ["pgb", "-q", "compress"]] == [
        ["--no-refinetune"], ["--teacher-cache", str(tmp_path / "tc")]]
    bench = [shlex.split(x) for x in lines if x.startswith("pgb -q bench")]
    # one bench of the task's two models; no structured twin planned or present
    assert [c[3:] for c in bench] == [[
        "--model", str(tmp_path / "runs" / "minilm-mrpc-pgb-uniform-s0.5-rft"),
        "--model", str(tmp_path / "runs" / "minilm-mrpc-pgb-nocomp-s0.5-rft"),
        "--baseline", str(tmp_path / "teachers" / "mrpc"),
        "--batch-size", "8", "--seq-len", "64", "--threads", "1"]]


def test_dry_run_projects_the_time_from_runs_on_record(capsys, tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    for sparsity, wall in ((0.75, 100.0), (0.875, 300.0), (0.6, 1000.0)):
        record = result("mrpc", "pgb", sparsity, 0.7, 1.5)  # re-finetune stage: 100 s
        record["wall_seconds"] = wall
        (res / f"{record['name']}.json").write_text(json.dumps(record))
    failed = {**result("mrpc", "magnitude", 0.75, 0.7, 1.0), "error": "RunFailed"}
    (res / "failed.json").write_text(json.dumps(failed))
    (res / "broken.json").write_text("{")
    lines = dry(capsys, tmp_path, "--methods", "pgb,magnitude", "--refinetune", "both")
    # pgb re-finetuned: median of 100, 300, 1000 = 300; one shot: its twins less their
    # re-finetune stage, median of 0, 200, 900 = 200; magnitude has only a failed run
    assert lines[-1].startswith("# projected: 0h08m20s for 2 runs")
    assert lines[-1].endswith("; 2 runs have no record like them and are not counted")


def test_missing_teacher_is_built_by_teachers_sh(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "DEFAULT_TEACHERS", tmp_path / "teachers")
    lines = dry(capsys, tmp_path, "--tasks", "mrpc,stsb", "--methods", "pgb",
                "--refinetune", "no")
    assert lines.count("bash benchmarks/teachers.sh stsb") == 1
    assert "bash benchmarks/teachers.sh mrpc" not in lines  # its folder exists
    # the projection counts the STS-B teacher's recorded training time (no runs on record)
    seconds = campaign.teacher_seconds("stsb")
    assert seconds is not None and seconds > 0
    assert lines[-1].startswith(f"# projected: {campaign.hms(seconds)} for 0 runs")
    assert f"{campaign.hms(seconds)} of it for 1 teacher;" in lines[-1]


def test_missing_teacher_elsewhere_is_an_explained_error(capsys, tmp_path):
    lines = dry(capsys, tmp_path, "--tasks", "stsb", "--methods", "pgb", "--refinetune", "no")
    assert any(line.startswith("# no teacher at") and "pgb finetune" in line for line in lines)


def test_unknown_method_is_rejected(capsys, tmp_path):
    assert campaign.main(["--methods", "pgb,prune-all", "--dry-run"]) == 2
    assert "unknown method ['prune-all']" in capsys.readouterr().err


def test_existing_results_are_skipped(capsys, tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    (res / "minilm-mrpc-pgb-s0.5-nrft.json").write_text(json.dumps({"name": "x"}))
    (res / "minilm-mrpc-magnitude-s0.5-nrft.json").write_text(json.dumps({"error": "boom"}))
    args = ("--methods", "pgb,magnitude,structured", "--refinetune", "no")
    lines = dry(capsys, tmp_path, *args)
    assert lines[0] == "# 3 runs in the grid, 2 with results already (skipped), 1 to run"
    assert [x for x in lines if x.startswith("# minilm")] == [
        "# minilm-mrpc-structured-s0.5-nrft"]
    lines = dry(capsys, tmp_path, *args, "--retry-failed")
    assert [x for x in lines if x.startswith("# minilm")] == [
        "# minilm-mrpc-structured-s0.5-nrft", "# minilm-mrpc-magnitude-s0.5-nrft"]
    lines = dry(capsys, tmp_path, *args, "--force", "--limit", "2")
    assert len([x for x in lines if x.startswith("# minilm")]) == 2


# ---------------------------------------------------------------- campaign: execution


class FakeCLI:
    """Stands in for ``campaign.call``: writes report.json for compress, prints bench JSON."""

    def __init__(self, fail: str = "", teachers: Path | None = None):
        self.calls: list[list[str]] = []
        self.fail, self.teachers = fail, teachers

    def __call__(self, cmd: list[str], env=None) -> str:
        self.calls.append(cmd)
        if cmd[0] == "bash":  # benchmarks/teachers.sh TASK
            (self.teachers / cmd[-1]).mkdir(parents=True)
            return ""
        out = Path(cmd[cmd.index("--out") + 1] if "--out" in cmd else "")
        if cmd[2] == "compress":
            if self.fail and self.fail in out.name:
                raise campaign.RunFailed(cmd, 1, "x" * 5000 + "CUDA out of memory")
            out.mkdir(parents=True, exist_ok="--overwrite" in cmd)
            budgets = cmd[cmd.index("--sparsity") + 1].split(",")
            sweep = len(budgets) > 1  # pgb's layout: one folder per budget, and sweep.json
            for i, budget in enumerate(budgets):
                report = result("mrpc", "pgb", float(budget), 0.72, 0.0)["report"]
                report.update(config={"seed": 0}, versions={"pgb": "0.1.0"}, matrices=[1] * 9)
                report["stage_seconds"] = {**report["stage_seconds"], "importance": 10.0 + i}
                folder = out / f"s{float(budget):g}" if sweep else out
                folder.mkdir(exist_ok=True)
                (folder / "report.json").write_text(json.dumps(report))
            if sweep:
                (out / "sweep.json").write_text("{}")
                (out / "log.txt").write_text("the sweep's log")
            return '{"method": "pgb"}\n'
        if self.fail == "bench":
            raise campaign.RunFailed(cmd, 1, "Killed")
        models = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--model"]
        figures = {m: {"speedup": 2.0 if "structured" in m else 1.7, "latency_ms": 10.0,
                       "batch_size": 32, "baseline_latency_ms": 17.0} for m in models}
        out = figures[models[0]] if len(models) == 1 else {"models": figures}
        return "progress noise\n" + json.dumps({**out, "reuse_memory": False}) + "\n"


def test_campaign_writes_records_and_continues_after_a_failure(capsys, tmp_path, monkeypatch):
    fake = FakeCLI(fail="magnitude")
    monkeypatch.setattr(campaign, "call", fake)
    (tmp_path / "teachers" / "mrpc").mkdir(parents=True)
    argv = ["--tasks", "mrpc", "--sparsities", "0.5", "--methods", "pgb,magnitude,structured",
            "--refinetune", "no", "--teachers", str(tmp_path / "teachers"),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            "--data-dir", str(tmp_path / "data")]
    assert campaign.main(argv) == 1  # one failed run
    progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert [x.split(":")[0] for x in progress] == [
        "[1/3] minilm-mrpc-structured-s0.5-nrft", "[2/3] minilm-mrpc-magnitude-s0.5-nrft",
        "[3/3] minilm-mrpc-pgb-s0.5-nrft"]
    assert "FAILED" in progress[1] and "ETA" in progress[0]

    rec = json.loads((tmp_path / "res" / "minilm-mrpc-pgb-s0.5-nrft.json").read_text())
    assert {"name", "model", "task", "method", "variant", "sparsity", "refinetune", "seed",
            "commands", "versions", "report", "bench", "date", "wall_seconds"} <= set(rec)
    assert (rec["method"], rec["variant"], rec["refinetune"], rec["seed"]) == \
        ("pgb", "pgb", False, 0)
    assert rec["report"]["main_metric"] == "accuracy"
    assert rec["report"]["main_value"] == 0.72
    assert rec["report"]["ratio_to_teacher"] == pytest.approx(0.9)
    assert "matrices" not in rec["report"]
    # its figures and its structured twin's, from one bench of the task's models
    assert rec["bench"] == {"speedup": 1.7, "latency_ms": 10.0, "batch_size": 32,
                            "baseline_latency_ms": 17.0, "structured_speedup": 2.0,
                            "structured_latency_ms": 10.0, "reuse_memory": False}
    assert [shlex.split(c)[2] for c in rec["commands"]] == ["compress", "bench"]
    runs = tmp_path / "runs"
    assert [x for x in shlex.split(rec["commands"][1]) if str(runs) in x] == [
        str(runs / "minilm-mrpc-structured-s0.5-nrft"), str(runs / "minilm-mrpc-pgb-s0.5-nrft")]
    twin = json.loads((tmp_path / "res" / "minilm-mrpc-structured-s0.5-nrft.json").read_text())
    assert twin["bench"]["speedup"] == 2.0 and "structured_speedup" not in twin["bench"]

    bad = json.loads((tmp_path / "res" / "minilm-mrpc-magnitude-s0.5-nrft.json").read_text())
    assert bad["error"] == "RunFailed: `pgb -q compress` exited with status 1"
    assert bad["stderr_tail"].endswith("CUDA out of memory")
    assert len(bad["stderr_tail"]) == campaign.TAIL_CHARS

    fake.calls.clear()  # a second campaign skips everything that has a result
    assert campaign.main(argv) == 0 and fake.calls == []


def test_finished_compress_folder_is_reused(tmp_path, monkeypatch):
    fake = FakeCLI()
    monkeypatch.setattr(campaign, "call", fake)
    (tmp_path / "teachers" / "mrpc").mkdir(parents=True)
    argv = ["--tasks", "mrpc", "--sparsities", "0.5", "--methods", "pgb", "--refinetune",
            "yes", "--teachers", str(tmp_path / "teachers"), "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert campaign.main(argv) == 0
    (tmp_path / "res" / "minilm-mrpc-pgb-s0.5-rft.json").unlink()  # e.g. killed while benching
    fake.calls.clear()
    assert campaign.main(argv) == 0
    assert [c[2] for c in fake.calls] == ["bench"]
    fake.calls.clear()
    assert campaign.main([*argv, "--force"]) == 0
    assert [c[2] for c in fake.calls] == ["compress", "bench"] and "--overwrite" in fake.calls[0]


def test_a_failed_bench_fails_the_task_runs_and_times_are_shared(tmp_path, monkeypatch):
    fake = FakeCLI(fail="bench")
    monkeypatch.setattr(campaign, "call", fake)
    clock = iter(range(0, 1000, 10))  # every time.time() call: 10 s later
    monkeypatch.setattr(campaign.time, "time", lambda: float(next(clock)))
    (tmp_path / "teachers" / "mrpc").mkdir(parents=True)
    argv = ["--tasks", "mrpc", "--sparsities", "0.5,0.75", "--methods", "pgb",
            "--refinetune", "yes", "--teachers", str(tmp_path / "teachers"),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert campaign.main(argv) == 1  # failures
    recs = [json.loads((tmp_path / "res" / f"minilm-mrpc-pgb-s{s}-rft.json").read_text())
            for s in ("0.5", "0.75")]
    assert all(r["error"] == "RunFailed: `pgb -q bench` exited with status 1" for r in recs)
    assert all(r["stderr_tail"] == "Killed" and "bench" not in r for r in recs)
    # the sweep's 10 s shared by its two runs; a failed bench adds nothing
    assert [r["wall_seconds"] for r in recs] == [5.0, 5.0]
    fake.fail, fake.calls = "", []  # retried: the compressed folders are reused
    assert campaign.main([*argv, "--retry-failed"]) == 0
    assert [c[2] for c in fake.calls] == ["bench"]
    recs = [json.loads((tmp_path / "res" / f"minilm-mrpc-pgb-s{s}-rft.json").read_text())
            for s in ("0.5", "0.75")]
    assert [r["wall_seconds"] for r in recs] == [5.0, 5.0]  # the bench's 10 s, shared
    assert all(r["reused_compress_output"] and r["bench"]["speedup"] == 1.7 for r in recs)


def test_missing_teacher_is_built_once_or_recorded_as_the_failure(tmp_path, monkeypatch):
    argv = ["--tasks", "mrpc", "--sparsities", "0.5,0.75", "--methods", "pgb",
            "--refinetune", "no", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--teachers", str(tmp_path / "teachers")]
    fake = FakeCLI(teachers=tmp_path / "teachers")
    monkeypatch.setattr(campaign, "call", fake)
    monkeypatch.setattr(campaign, "DEFAULT_TEACHERS", tmp_path / "teachers")
    assert campaign.main(argv) == 0
    assert [c[:2] + c[2:3] for c in fake.calls] == [  # one sweep makes both budgets
        ["bash", "benchmarks/teachers.sh", "mrpc"], ["pgb", "-q", "compress"],
        ["pgb", "-q", "bench"]]

    fake.calls.clear()  # a teacher folder elsewhere that is missing: recorded, nothing run
    other = [*argv[:-1], str(tmp_path / "elsewhere"), "--results", str(tmp_path / "res2")]
    assert campaign.main(other) == 1 and fake.calls == []
    rec = json.loads((tmp_path / "res2" / "minilm-mrpc-pgb-s0.5-nrft.json").read_text())
    assert rec["error"].startswith("RuntimeError: teacher: no teacher at")


def test_sweeps_make_each_run_folder_and_record(tmp_path, monkeypatch, capsys):
    fake = FakeCLI(fail="magnitude")
    monkeypatch.setattr(campaign, "call", fake)
    (tmp_path / "teachers" / "mrpc").mkdir(parents=True)
    runs, res = tmp_path / "runs", tmp_path / "res"
    argv = ["--tasks", "mrpc", "--sparsities", "0.5,0.75", "--methods",
            "pgb,structured,magnitude", "--refinetune", "yes", "--teachers",
            str(tmp_path / "teachers"), "--runs", str(runs), "--results", str(res),
            "--data-dir", str(tmp_path / "data")]
    assert campaign.main(argv) == 1  # the magnitude sweep failed: both of its runs
    compress = [c for c in fake.calls if c[2] == "compress"]
    assert [c[c.index("--out") + 1] for c in compress] == [
        str(runs / f"minilm-mrpc-{v}-sweep-rft") for v in ("structured", "magnitude", "pgb")]
    assert all(c[c.index("--sparsity") + 1] == "0.5,0.75" for c in compress)
    assert all(c[c.index("--teacher-cache") + 1] == str(runs / "teacher-cache")
               for c in compress)
    assert sorted(p.name for p in runs.iterdir()) == sorted(  # sweep folders moved, removed
        f"minilm-mrpc-{v}-s{s}-rft" for v in ("structured", "pgb") for s in ("0.5", "0.75"))
    for s in ("0.5", "0.75"):  # each run keeps the sweep's log and summary
        kept = runs / f"minilm-mrpc-pgb-s{s}-rft" / "sweep"
        assert (kept / "log.txt").read_text() == "the sweep's log"
        assert (kept / "sweep.json").is_file()
    first, second = (json.loads((res / f"minilm-mrpc-pgb-s{s}-rft.json").read_text())
                     for s in ("0.5", "0.75"))
    assert first["sweep"] == second["sweep"] == [0.5, 0.75]
    assert first["commands"][0] == second["commands"][0] == shlex.join(compress[2])
    assert "shared_prune_seconds" not in first
    assert second["shared_prune_seconds"] == 10.0 + 20.0  # the first budget's own stages
    assert make_results.prune_seconds(second) == 11.0 + 20.0 + 30.0 + 30.0
    assert second["report"]["achieved_sparsity"] == 0.75
    assert first["commands"][1] == second["commands"][1]  # one bench of the task's models
    assert second["bench"]["structured_speedup"] == 2.0
    bad = json.loads((res / "minilm-mrpc-magnitude-s0.75-rft.json").read_text())
    assert bad["error"].startswith("RunFailed") and "--sparsity 0.5,0.75" in bad["commands"][0]
    capsys.readouterr()

    fake.calls.clear()  # the failed sweep again: only its runs
    assert campaign.main([*argv, "--retry-failed"]) == 1
    assert [c[2] for c in fake.calls] == ["compress"]
    dry = campaign.main([*argv, "--force", "--dry-run", "--methods", "pgb", "--no-sweep"])
    lines = capsys.readouterr().out.splitlines()
    assert dry == 0 and not any(x.startswith("# sweep") for x in lines)
    assert [x.split("--sparsity ")[1].split()[0] for x in lines if " compress " in x] == \
        ["0.5", "0.75"]
    assert campaign.main([*argv, "--force", "--dry-run", "--methods", "pgb"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "# sweep: minilm-mrpc-pgb-s0.5-rft, minilm-mrpc-pgb-s0.75-rft" in lines
    assert sum(" compress " in x for x in lines) == 1 and sum(" bench " in x for x in lines) == 1


def test_results_md_counts_files_apart_from_derived_rows(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for sparsity in (0.5, 0.75):  # re-finetuned, with their metrics before re-finetuning
        rec = result("mrpc", "pgb", sparsity, 0.76, 1.8)
        rec["report"]["metrics_before_refinetune"] = {"accuracy": 0.7, "f1": 0.8}
        (folder / f"{rec['name']}.json").write_text(json.dumps(rec))
    out = tmp_path / "RESULTS.md"
    assert make_results.main(["--results", str(folder), "--out", str(out),
                              "--plots", str(tmp_path / "plots")]) == 0
    assert "- 2 result files, 0 failed; 2 no-re-finetuning rows derived from them" in \
        out.read_text().splitlines()


def test_no_refinetune_rows_derived_from_before_metrics():
    rec = {"name": "minilm-mrpc-pgb-s0.5-rft", "task": "mrpc", "variant": "pgb",
           "method": "pgb", "sparsity": 0.5, "refinetune": True,
           "report": {"main_metric": "accuracy", "main_value": 0.8, "teacher_main_value": 0.82,
                      "metrics": {"accuracy": 0.8}, "metrics_before_refinetune":
                      {"accuracy": 0.41}, "stage_seconds": {"refinetune": 100.0}}}
    rows = make_results.derive_no_refinetune([rec])
    derived = [r for r in rows if not r["refinetune"]]
    assert len(derived) == 1
    d = derived[0]
    assert d["name"] == "minilm-mrpc-pgb-s0.5-nrft" and d["derived_from"] == rec["name"]
    assert d["report"]["main_value"] == 0.41
    assert d["report"]["ratio_to_teacher"] == pytest.approx(0.41 / 0.82)
    assert d["report"]["stage_seconds"]["refinetune"] == 0.0
    # a real no-re-finetune run wins over the derived row
    real = dict(rec, name="minilm-mrpc-pgb-s0.5-nrft", refinetune=False)
    assert len(make_results.derive_no_refinetune([rec, real])) == 2


def test_notes_beside_the_results_go_into_results_md(results_dir, tmp_path):
    (results_dir / "NOTES.md").write_text("PGB loses on STS-B at 0.875: 0.18 vs 0.83.\n")
    out = tmp_path / "RESULTS.md"
    assert make_results.main(["--results", str(results_dir), "--out", str(out),
                              "--plots", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "## Notes\n\nPGB loses on STS-B at 0.875: 0.18 vs 0.83.\n" in text
    assert text.index("## Notes") < text.index("## mrpc")
    assert "## Notes" not in make_results.render(make_results.load_results(results_dir))


# ---------------------------------------------------------------- speed.py rounds

def _speed_record(case: str, batch: int, round_: int, dense: float, pgb: float) -> dict:
    return {"case": case, "batch_size": batch, "seq_len": 128, "round": round_,
            "achieved_sparsity": 0.875, "baseline_latency_ms": dense, "latency_ms": pgb,
            "speedup": dense / pgb, "checkpoint_bytes": 2**20, "baseline_checkpoint_bytes":
            2**21, "threads": 2, "reuse_memory": True, "cpu": "test cpu"}


def test_speed_rounds_report_median_of_per_round_speedups():
    speed = _load("speed")
    # the machine drifts between rounds: each round's ratio is taken on its own
    recs = [_speed_record("a", 1, 0, 30.0, 15.0), _speed_record("a", 1, 1, 45.0, 15.0),
            _speed_record("a", 1, 2, 33.0, 12.0), _speed_record("b", 32, 0, 800.0, 400.0)]
    rows = {r["case"]: r for r in speed.rows(recs)}
    assert rows["a"]["rounds"] == 3 and rows["b"]["rounds"] == 1
    assert rows["a"]["speedup"] == [2.0, 3.0, 2.75]
    md = speed.table(recs)
    # median of the per-round ratios (2.75), not the ratio of median latencies (33 / 15)
    assert "| a | 1x128 | 0.875 | 33.0 | 15.0 | 2.75x (2.00-3.00) |" in md
    assert "| b | 32x128 | 0.875 | 800.0 | 400.0 | 2.00x |" in md
    assert "3 rounds" in md
    assert "rounds" not in speed.table([recs[-1]]).split("\n")[-2]


# ---------------------------------------------------------------- compile_speed.py

def test_compile_speed_table_gives_both_comparisons():
    _load("speed")  # compile_speed imports it by name, as when run from benchmarks/
    compile_speed = _load("compile_speed")
    models = {"teacher": {"eager_ms": 40.0, "compiled_ms": 32.0, "compile_s": 9.0},
              "pgb": {"eager_ms": 20.0, "compiled_ms": 10.0, "compile_s": 5.0}}
    record = {"teacher": "teacher", "threads": 2, "torch": "x", "cpu": "y",
              "shapes": [{"batch_size": 1, "seq_len": 128, "models": models}]}
    row = next(line for line in compile_speed.table(record).splitlines() if "| pgb |" in line)
    # compiled/eager 0.50; both eager 40/20; both compiled 32/10; compiled vs eager 40/10
    assert row == "| 1x128 | pgb | 20.0 | 10.0 | 0.50 | 2.00x | 3.20x | 4.00x |"


# ---------------------------------------------------------------- report_table.py

def _compress_report(task: str, method: str, lr: float, seed: int, after: float) -> dict:
    """A pgb compress report.json with the keys report_table reads, known values."""
    return {"task": task, "method": method, "target_sparsity": 0.5,
            "config": {"refinetune_lr": lr, "seed": seed},
            "stage_seconds": {"importance": 10.0, "grouping": 20.0, "compensation": 5.0,
                              "refinetune": 100.0},
            "refinetune": {"steps": 115}, "command": f"pgb compress --method {method}",
            "metrics": {"accuracy": after, "f1": 0.5},
            "metrics_before_refinetune": {"accuracy": 0.7, "f1": 0.4},
            "teacher_metrics": {"accuracy": 0.8, "f1": 0.9}}


def test_report_table_rows_from_report_and_campaign_files(tmp_path):
    report_table = _load("report_table")
    (tmp_path / "a-report.json").write_text(
        json.dumps(_compress_report("mrpc", "pgb", 3e-4, 1, 0.792)))
    # a campaign JSON: the task and commands beside a report without them
    trimmed = _compress_report("mrpc", "structured", 1e-4, 0, 0.8)
    for key in ("task", "command", "refinetune"):
        trimmed.pop(key)
    trimmed["refinetune_steps"] = 115
    (tmp_path / "b.json").write_text(json.dumps(
        {"task": "mrpc", "commands": ["pgb compress --method structured"], "report": trimmed}))
    out = tmp_path / "t.md"
    assert report_table.main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"Command: `python benchmarks/report_table.py {tmp_path} --out {out} --title" in text
    rows = [line for line in text.splitlines() if line.startswith("| mrpc")]
    # sorted by method; 0.792 / 0.8 = 99.0%; prune + compensate = 10 + 20 + 5
    assert rows[0].startswith("| mrpc | pgb | 0.5 | 0.0003 | 115 | 1 | accuracy | 0.7000 "
                              "| 0.7920 | 0.8000 | 99.0% | 35 | 100 |")
    assert "| 100 | f1 0.5000 | `" in rows[0]
    assert rows[1].startswith("| mrpc | structured | 0.5 | 0.0001 | 115 | 0 | accuracy |")
    assert rows[1].endswith("| `pgb compress --method structured` |")


def test_report_table_rejects_what_is_not_a_report(tmp_path):
    report_table = _load("report_table")
    (tmp_path / "x.json").write_text(json.dumps({"speedup": 2.0}))
    with pytest.raises(ValueError, match="not a pgb compress report"):
        report_table.collect([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_table.collect([tmp_path / "missing"])
