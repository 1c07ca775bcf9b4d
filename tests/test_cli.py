"""End to end through the command line on a tiny model: finetune, compress, evaluate,
bench, export, report; and the errors users hit first."""

import contextlib
import json

import pytest
import transformers
from tiny import save_tiny_bert

from pgb.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_path):
    """A tiny random BERT with the real MiniLM tokenizer, saved like a hub checkpoint."""
    # QA windows are 384 tokens
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path,
                          max_position_embeddings=512)


def run(capsys, *argv) -> dict:
    assert main(["-q", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipeline_dirs(tiny_dir, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    teacher, comp = root / "teacher", root / "compressed"
    assert main(["-q", "finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(teacher), "--max-steps", "4",
                 "--max-train-samples", "96", "--batch-size", "16"]) == 0
    assert main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(comp), "--sparsity", "0.5",
                 "--calib-samples", "48", "--refinetune-steps", "2",
                 "--max-train-samples", "96"]) == 0
    return teacher, comp


def test_finetune_writes_a_teacher(pipeline_dirs):
    teacher, _ = pipeline_dirs
    record = json.loads((teacher / "metrics.json").read_text())
    assert record["task"] == "sst2" and record["train"]["steps"] == 4
    assert record["max_length"] == 128  # the window length used (QA: at least 384)
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert json.loads((teacher / "config.json").read_text())["pgb_task"] == "sst2"
    # a run in the background shows its progress in log.txt: one line per tenth (4 steps)
    lines = (teacher / "log.txt").read_text().splitlines()
    milestones = [line for line in lines if "pgb.progress" in line]
    assert [m.split("training step ")[1].split(" ")[0] for m in milestones] == \
        ["1/4", "2/4", "3/4", "4/4"]
    assert "min left" in milestones[-1]


def test_compress_writes_report_and_recipe(pipeline_dirs):
    _, comp = pipeline_dirs
    report = json.loads((comp / "report.json").read_text())
    for key in ("target_sparsity", "achieved_sparsity", "params_before", "params_after",
                "flops_ratio", "stage_seconds", "matrices", "dropped_sublayers",
                "teacher_metrics", "metrics"):
        assert key in report
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.005
    assert set(report["stage_seconds"]) >= {"importance", "grouping", "compensation",
                                            "refinetune"}
    assert report["params_after"] < report["params_before"]
    assert (comp / "recipe.json").is_file() and (comp / "tokenizer.json").is_file()


def test_evaluate_prints_metrics_json_last(pipeline_dirs, shared_data, capsys):
    _, comp = pipeline_dirs
    out = run(capsys, "evaluate", "--model", str(comp), "--task", "sst2", "--data-dir",
              str(shared_data), "--max-samples", "64")
    assert set(out) == {"accuracy", "samples"} and out["samples"] == 64


def test_bench_export_report(pipeline_dirs, tmp_path, capsys):
    teacher, comp = pipeline_dirs
    out = run(capsys, "bench", "--model", str(comp), "--baseline", str(teacher),
              "--batch-size", "2", "--seq-len", "16", "--repeats", "2", "--threads", "1",
              "--reuse-memory")
    assert out["reuse_memory"] is True and out["compile_backend"] is None
    from pgb import native
    assert out["native_kernel"] is native.available()
    for key in ("latency_ms", "baseline_latency_ms", "speedup", "params", "baseline_params",
                "checkpoint_bytes", "baseline_checkpoint_bytes", "peak_memory_mb"):
        assert key in out
    assert out["speedup"] == pytest.approx(out["baseline_latency_ms"] / out["latency_ms"])
    assert out["checkpoint_bytes"] < out["baseline_checkpoint_bytes"]
    onnx = run(capsys, "export", "--model", str(comp), "--out", str(tmp_path / "m.onnx"))
    assert onnx["max_abs_diff"] <= 1e-4
    rep = run(capsys, "report", str(comp))
    assert (comp / "report.md").read_text().startswith("# pgb report: sst2")
    assert (comp / "report.png").read_bytes()[:4] == b"\x89PNG" and rep["report_png"]


def test_bench_of_several_models_gives_each_its_one_model_figures(pipeline_dirs, capsys,
                                                                  monkeypatch):
    """``--model`` repeated: every model timed in the same rounds, each entry what a
    one-model bench prints; a structured twin among them composes with ``with_structured``."""
    import pgb.bench

    teacher, comp = pipeline_dirs
    seconds = {"compressed": 0.010, "compressed 0": 0.010, "structured": 0.020,
               "compressed 1": 0.020, "baseline": 0.030}
    timed = []

    def fake(models, *args, **kwargs):
        timed.append(list(models))
        return {name: [seconds[name]] * 5 for name in models}

    monkeypatch.setattr(pgb.bench, "time_models", fake)
    monkeypatch.setattr(pgb.bench, "peak_memory_mb", lambda *a, **k: 123.0)
    flags = ["--baseline", str(teacher), "--batch-size", "2", "--seq-len", "8", "--threads", "1"]
    one = run(capsys, "bench", "--model", str(comp), "--structured", str(teacher), *flags)
    many = run(capsys, "bench", "--model", str(comp), "--model", str(teacher), *flags)
    assert timed == [["compressed", "baseline", "structured"],
                     ["compressed 0", "compressed 1", "baseline"]]
    assert set(many["models"]) == {str(comp), str(teacher)}
    assert many["models"][str(comp)]["speedup"] == pytest.approx(3.0)
    assert many["models"][str(teacher)]["speedup"] == pytest.approx(1.5)
    assert many["baseline"]["latency_ms"] == pytest.approx(30.0)
    assert (many["batch_size"], many["seq_len"], many["threads"]) == (2, 8, 1)
    composed = pgb.bench.with_structured(many["models"][str(comp)], many["models"][str(teacher)])
    assert {**composed, "reuse_memory": False, "compile_backend": None} == one
    assert one["structured_speedup"] == pytest.approx(1.5)


def test_compress_with_shared_order_round_trips(pipeline_dirs, shared_data, tmp_path):
    import torch

    import pgb

    teacher, _ = pipeline_dirs
    out = tmp_path / "shared"
    assert main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(out), "--sparsity", "0.75",
                 "--calib-samples", "32", "--no-refinetune", "--shared-order",
                 "--embedding-dtype", "float16"]) == 0
    assert json.loads((out / "recipe.json").read_text())["meta"] == {"shared_order": True}
    assert json.loads((out / "config.json").read_text())["pgb_embedding_dtype"] == "float16"
    assert json.loads((out / "report.json").read_text())["config"]["shared_order"] is True
    model = pgb.load(out)
    table = model.get_input_embeddings().weight
    assert torch.equal(table, table.half().float())
    batch = {"input_ids": torch.randint(1000, 2000, (2, 9)),
             "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, pgb.densify(model)(**batch).logits,
                                   atol=1e-5, rtol=1e-5)


def test_existing_output_is_refused(pipeline_dirs, shared_data, capsys):
    teacher, comp = pipeline_dirs
    before = sorted(p.name for p in comp.iterdir())
    code = main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(comp), "--sparsity", "0.5"])
    assert code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in comp.iterdir()) == before


@pytest.mark.parametrize("argv,message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "sst2", "--sparsity", "1.3"], r"sparsity must be in \[0, 1\), got 1.3"),
    (["--task", "sst2", "--method", "foo"], "unknown method 'foo'"),
    (["--task", "mrpc"], "fine-tuned for task 'sst2'"),
])
def test_bad_input_names_the_value(pipeline_dirs, shared_data, tmp_path, capsys, argv, message):
    teacher, _ = pipeline_dirs
    args = {"--sparsity": "0.5", **dict(zip(argv[::2], argv[1::2], strict=True))}
    flat = [x for kv in args.items() for x in kv]
    code = main(["-q", "compress", "--model", str(teacher), "--data-dir", str(shared_data),
                 "--out", str(tmp_path / "x"), *flat])
    assert code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_unsupported_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    code = main(["-q", "evaluate", "--model", str(folder), "--task", "sst2"])
    assert code == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err


def test_offline_without_data_folder(pipeline_dirs, monkeypatch, capsys):
    teacher, _ = pipeline_dirs
    monkeypatch.delenv("PGB_DATA_DIR", raising=False)
    code = main(["-q", "evaluate", "--model", str(teacher), "--task", "sst2"])
    assert code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_question_answering_end_to_end(tiny_dir, shared_data, tmp_path, capsys):
    """SQuAD: teacher, PGB compression (QA loss for importance), evaluation with EM/F1."""
    teacher, comp = tmp_path / "qa-teacher", tmp_path / "qa-pgb"
    common = ["--task", "squad", "--data-dir", str(shared_data)]
    assert main(["-q", "finetune", "--model", str(tiny_dir), *common, "--out", str(teacher),
                 "--max-steps", "2", "--max-train-samples", "24", "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert main(["-q", "compress", "--model", str(teacher), *common, "--out", str(comp),
                 "--sparsity", "0.5", "--calib-samples", "16", "--refinetune-steps", "1",
                 "--max-train-samples", "24"]) == 0
    capsys.readouterr()
    report = json.loads((comp / "report.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.005
    out = run(capsys, "evaluate", "--model", str(comp), *common, "--max-samples", "20")
    assert set(out) >= {"exact_match", "f1"} and 0 <= out["f1"] <= 100


def test_latency_spread_known_answers():
    from pgb.bench import latency_spread

    assert latency_spread([2.0] * 10) == 0.0
    # 1..9: the 10th / 90th percentiles sit 0.8 and 7.2 steps above the smallest, at 1.8
    # and 8.2 (within the timings), the median is 5
    assert latency_spread([float(v) for v in range(1, 10)]) == pytest.approx((8.2 - 1.8) / 5)
    # five timings: the percentiles may not reach past the smallest and largest
    assert latency_spread([1.0, 2.0, 3.0, 4.0, 5.0]) <= (5.0 - 1.0) / 3.0
    assert latency_spread([1.0, 2.0, 3.0, 4.0]) is None  # too few for percentiles


def test_bench_warns_when_timings_are_noisy(pipeline_dirs, capsys, caplog, monkeypatch):
    import pgb.bench

    teacher, comp = pipeline_dirs
    steady, noisy = [0.010] * 9, [0.010, 0.011, 0.009, 0.010, 0.030, 0.005, 0.010, 0.02, 0.01]
    monkeypatch.setattr(pgb.bench, "time_models",
                        lambda models, *a, **k: {"compressed": noisy, "baseline": steady})
    out = run(capsys, "bench", "--model", str(comp), "--baseline", str(teacher),
              "--batch-size", "1", "--seq-len", "8", "--repeats", "9", "--threads", "1")
    assert out["baseline_latency_spread"] == 0.0 and out["latency_spread"] > 0.2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("compressed: latency varied by") and "--repeats" in m
               for m in warned), warned
    assert not any(m.startswith("baseline:") for m in warned)


def test_bench_compile_times_compiled_models(pipeline_dirs, capsys, monkeypatch):
    import torch

    import pgb.bench

    teacher, comp = pipeline_dirs
    timed, time_models = {}, pgb.bench.time_models

    def spy(models, *args, **kwargs):
        timed.update(models)
        return time_models(models, *args, **kwargs)

    monkeypatch.setattr(pgb.bench, "time_models", spy)
    torch._dynamo.reset()
    # aot_eager: traced and compiled through the same graph capture, no C++ compiler needed
    out = run(capsys, "bench", "--model", str(comp), "--baseline", str(teacher),
              "--batch-size", "2", "--seq-len", "16", "--repeats", "2", "--threads", "1",
              "--compile", "aot_eager")
    assert out["compile_backend"] == "aot_eager"
    assert set(timed) == {"compressed", "baseline"}
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in timed.values())
    assert out["speedup"] == pytest.approx(out["baseline_latency_ms"] / out["latency_ms"])
    assert out["params"] < out["baseline_params"]  # counted on the models, not the wrappers


def test_progress_milestones_stay_off_the_terminal(capsys):
    """Without -q the bars show progress: the milestone lines go to log.txt only."""
    import logging

    from pgb.cli import setup_logging
    setup_logging(quiet=False)
    try:
        logging.getLogger("pgb.progress").info("training step 1/2")
        logging.getLogger("pgb.commands").info("fine-tuning x")
        err = capsys.readouterr().err
        assert "fine-tuning x" in err and "training step" not in err
    finally:
        setup_logging(quiet=True)


def test_dev_subset_scores_teacher_and_result_on_the_same_examples(pipeline_dirs, shared_data,
                                                                   tmp_path, capsys):
    """--max-eval-samples: the teacher's metrics.json (whole dev split) is not reused."""
    teacher, _ = pipeline_dirs
    out = tmp_path / "subset"
    run(capsys, "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
        str(shared_data), "--out", str(out), "--sparsity", "0.5", "--calib-samples", "32",
        "--no-refinetune", "--max-eval-samples", "40")
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["samples"] == report["teacher_metrics"]["samples"] == 40
    whole = json.loads((teacher / "metrics.json").read_text())["metrics"]["samples"]
    assert whole == 872


def test_max_eval_samples_must_be_positive(tiny_dir, shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["-q", "finetune", "--model", str(tiny_dir), "--task", "sst2", "--out",
              str(tmp_path / "t"), "--max-eval-samples", "0"])
    assert "--max-eval-samples: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("method,scorer", [("pgb", "importance_scores"),
                                           ("structured", "mask_fisher")])
def test_sparsity_sweep_equals_separate_runs(pipeline_dirs, shared_data, tmp_path, capsys,
                                             monkeypatch, method, scorer):
    """--sparsity 0.5,0.75 scores the teacher once and writes the same models as two runs."""
    import torch

    import pgb
    import pgb.baselines
    import pgb.pipeline

    teacher, _ = pipeline_dirs
    common = ["--model", str(teacher), "--task", "sst2", "--data-dir", str(shared_data),
              "--calib-samples", "32", "--no-refinetune", "--max-eval-samples", "40",
              "--method", method]
    calls = _count_calls(monkeypatch, pgb.baselines if method == "structured" else
                         pgb.pipeline, scorer)
    sweep = run(capsys, "compress", *common, "--sparsity", "0.5,0.75",
                "--out", str(tmp_path / "sweep"))
    assert len(calls) == 1  # importance computed once for both budgets
    assert sweep["folders"] == ["s0.5", "s0.75"]
    assert [s["target_sparsity"] for s in sweep["sweep"]] == [0.5, 0.75]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == sweep
    batch = {"input_ids": torch.randint(1000, 2000, (3, 11)),
             "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    for sparsity, name in ((0.5, "s0.5"), (0.75, "s0.75")):
        single = run(capsys, "compress", *common, "--sparsity", str(sparsity),
                     "--out", str(tmp_path / f"single{sparsity}"))
        part = json.loads((tmp_path / "sweep" / name / "report.json").read_text())
        assert part["metrics"] == single["metrics"]
        assert part["achieved_sparsity"] == single["achieved_sparsity"]
        with torch.no_grad():
            a = pgb.load(tmp_path / "sweep" / name)(**batch).logits
            b = pgb.load(tmp_path / f"single{sparsity}")(**batch).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(calls) == 3  # each separate run scored the teacher again
    # the sweep folder is not a model: loading it names the folders to pass instead
    with pytest.raises(ValueError, match="is a sparsity sweep.*s0.5"):
        pgb.load(tmp_path / "sweep")
    code = main(["-q", "evaluate", "--model", str(tmp_path / "sweep"), "--task", "sst2",
                 "--data-dir", str(shared_data)])
    assert code == 2 and "s0.75" in capsys.readouterr().err
    # pgb report: one row per budget, its accuracy, and every budget's own report
    paths = run(capsys, "report", str(tmp_path / "sweep"))
    assert paths["report_md"] == str(tmp_path / "sweep" / "report.md")
    rows = [line.split(" | ") for line in (tmp_path / "sweep" / "report.md").read_text()
            .splitlines() if line.startswith("| [s")]
    assert [r[1] for r in rows] == ["0.5", "0.75"]
    for row, name in zip(rows, ("s0.5", "s0.75"), strict=True):
        accuracy = json.loads((tmp_path / "sweep" / name / "report.json").read_text())[
            "metrics"]["accuracy"]
        assert row[5].startswith(f"{accuracy:.4f} (")
        assert (tmp_path / "sweep" / name / "report.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "report.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["pgb", "structured"])
def test_teacher_cache_skips_the_teacher_and_keeps_the_result(pipeline_dirs, shared_data,
                                                               tmp_path, capsys, method):
    """A sweep reuses the teacher's re-finetuning outputs across budgets, --teacher-cache
    across runs; the models are the ones a run without the cache writes."""
    import torch

    import pgb

    teacher, _ = pipeline_dirs
    cache = tmp_path / "cache"
    common = ["--model", str(teacher), "--task", "sst2", "--data-dir", str(shared_data),
              "--calib-samples", "32", "--max-eval-samples", "40", "--method", method,
              "--refinetune-steps", "3", "--max-train-samples", "48"]
    plain = run(capsys, "compress", *common, "--sparsity", "0.5", "--out", str(tmp_path / "a"))
    sweep = run(capsys, "compress", *common, "--sparsity", "0.5,0.75", "--teacher-cache",
                str(cache), "--out", str(tmp_path / "sweep"))
    again = run(capsys, "compress", *common, "--sparsity", "0.5", "--teacher-cache",
                str(cache), "--out", str(tmp_path / "b"))
    reports = [json.loads((tmp_path / f).read_text())["refinetune"]["teacher_cache"]
               for f in ("sweep/s0.5/report.json", "sweep/s0.75/report.json", "b/report.json")]
    pieces = reports[0]["misses"]  # kept per piece of each of the 3 steps' batches
    assert pieces >= 3
    assert [(r["misses"], r["hits"]) for r in reports] == [(pieces, 0), (0, pieces), (0, pieces)]
    assert len(list(cache.glob("*.pt"))) == 1
    assert plain["metrics"] == again["metrics"] == sweep["sweep"][0]["metrics"]
    batch = {"input_ids": torch.randint(1000, 2000, (3, 11)),
             "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    with torch.no_grad():
        logits = [pgb.load(tmp_path / f)(**batch).logits for f in ("a", "b", "sweep/s0.5")]
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    torch.testing.assert_close(logits[2], logits[0], atol=0, rtol=0)


@pytest.mark.parametrize("value,message", [
    ("0.5,x", "comma-separated numbers such as 0.5,0.875, got '0.5,x'"),
    ("0.5,0.5", "a value appears twice in '0.5,0.5'"),
])
def test_sweep_values_are_checked(pipeline_dirs, tmp_path, capsys, value, message):
    teacher, _ = pipeline_dirs
    with pytest.raises(SystemExit):
        main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--out",
              str(tmp_path / "x"), "--sparsity", value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sweep_with_a_sparsity_out_of_range_writes_nothing(pipeline_dirs, shared_data, tmp_path,
                                                           capsys):
    teacher, _ = pipeline_dirs
    code = main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(tmp_path / "x"), "--sparsity", "0.5,1.5"])
    assert code == 2 and "sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compress_sweep_refuses_budgets_that_differ_elsewhere():
    from pgb.config import CompressConfig
    from pgb.pipeline import compress_sweep

    cfgs = [CompressConfig(sparsity=0.5), CompressConfig(sparsity=0.75, calib_samples=64)]
    with pytest.raises(ValueError, match="share every setting but the sparsity"):
        next(compress_sweep(None, None, None, cfgs, None))


def test_run_fine_tunes_then_sweeps_and_prints_side_by_side(tiny_dir, shared_data, tmp_path,
                                                           capsys):
    """`pgb run` on a base model: teacher into OUT-teacher, then one folder per budget."""
    out = tmp_path / "job"
    assert main(["-q", "run", "--model", str(tiny_dir), "--task", "sst2", "--data-dir",
                 str(shared_data), "--out", str(out), "--sparsity", "0.5,0.75",
                 "--teacher-epochs", "1", "--teacher-max-train-samples", "64",
                 "--max-train-samples", "64", "--calib-samples", "32", "--refinetune-steps",
                 "1", "--max-eval-samples", "40"]) == 0
    printed = capsys.readouterr()
    result, err = json.loads(printed.out.strip().splitlines()[-1]), printed.err
    teacher = json.loads((tmp_path / "job-teacher" / "metrics.json").read_text())
    assert teacher["train"]["steps"] == 2 and teacher["metrics"]["samples"] == 40
    assert [s["target_sparsity"] for s in result["sweep"]] == [0.5, 0.75]
    for name, summary in zip(("s0.5", "s0.75"), result["sweep"], strict=True):
        report = json.loads((out / name / "report.json").read_text())
        assert report["refinetune"]["steps"] == 1
        assert report["metrics"] == summary["metrics"]
        assert report["teacher_metrics"] == teacher["metrics"]
    # one side-by-side table per budget, naming its sparsity
    rows = [line.split() for line in err.splitlines() if line.strip().startswith("sparsity")]
    assert rows == [["sparsity", "0.0", "0.5"], ["sparsity", "0.0", "0.75"]]


@pytest.mark.parametrize("method", ["pgb", "structured"])
def test_flops_budget_sweep_meets_each_ratio(pipeline_dirs, shared_data, tmp_path, capsys,
                                             method):
    """--flops-ratio 0.6,0.4: the smallest sparsity whose model has at most those FLOPs."""
    teacher, _ = pipeline_dirs
    out = tmp_path / "flops"
    sweep = run(capsys, "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                str(shared_data), "--out", str(out), "--flops-ratio", "0.6,0.4",
                "--calib-samples", "32", "--no-refinetune", "--max-eval-samples", "40",
                "--method", method)
    assert sweep["folders"] == ["f0.6", "f0.4"]
    solved = []
    for target, name in ((0.6, "f0.6"), (0.4, "f0.4")):
        report = json.loads((out / name / "report.json").read_text())
        assert report["target_flops_ratio"] == target
        # measured on the built model; in this tiny model at 128 tokens the attention
        # products are half the FLOPs, so dropping one attention sublayer is a big step
        assert target - 0.15 <= report["flops_ratio"] <= target
        assert report["config"]["sparsity"] == report["target_sparsity"] > 0.3
        assert report["config"]["flops_ratio"] == target
        solved.append(report["target_sparsity"])
    assert solved[0] < solved[1]


@pytest.mark.parametrize("method", ["pgb", "structured"])
def test_speedup_budget_sweep_meets_each_target(pipeline_dirs, shared_data, tmp_path, capsys,
                                                monkeypatch, method):
    """--speedup 1.5,2: the smallest sparsity whose built model is that much faster. Timings
    of a tiny model are noise, so the speed-up is stood in for by the FLOPs it saves
    (pgb.latency's own timing is tested in test_latency.py)."""
    import pgb.latency
    from pgb.bench import load_any
    from pgb.flops import flops

    shapes = []

    def by_flops(model, reference, batch_size, seq_len, repeats=None):
        shapes.append((batch_size, seq_len))
        return flops(reference, seq_len) / flops(model, seq_len)

    monkeypatch.setattr(pgb.latency, "timer",
                        lambda reference, batch_size, seq_len: contextlib.nullcontext(by_flops))
    teacher, _ = pipeline_dirs
    reference = load_any(str(teacher))
    out = tmp_path / "speedup"
    sweep = run(capsys, "compress", "--model", str(teacher), "--task", "sst2", "--data-dir",
                str(shared_data), "--out", str(out), "--speedup", "1.5,2",
                "--speedup-batch-size", "4", "--speedup-seq-len", "64",
                "--calib-samples", "32", "--no-refinetune", "--max-eval-samples", "40",
                "--method", method)
    assert sweep["folders"] == ["x1.5", "x2"]
    assert set(shapes) == {(4, 64)}
    solved = []
    for target, name in ((1.5, "x1.5"), (2.0, "x2")):
        report = json.loads((out / name / "report.json").read_text())
        assert report["target_speedup"] == target and report["speedup_shape"] == [4, 64]
        assert report["planned_speedup"] >= target
        assert report["config"]["sparsity"] == report["target_sparsity"] > 0.1
        assert report["stage_seconds"]["speedup_search"] > 0
        # the saved model is the one that was planned: its FLOPs give the same speed-up
        saved = load_any(str(out / name))
        assert by_flops(saved, reference, 4, 64) == pytest.approx(report["planned_speedup"])
        solved.append(report["target_sparsity"])
    assert solved[0] < solved[1]


def test_sparsity_and_flops_budget_are_exclusive(pipeline_dirs, tmp_path, capsys):
    teacher, _ = pipeline_dirs
    with pytest.raises(SystemExit):
        main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--out",
              str(tmp_path / "x"), "--sparsity", "0.5", "--flops-ratio", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-q", "compress", "--model", str(teacher), "--task", "sst2", "--out",
              str(tmp_path / "x")])
    assert "one of the arguments --sparsity --flops-ratio --speedup is required" in \
        capsys.readouterr().err


def test_every_option_of_every_command_has_help():
    import argparse

    from pgb.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {opt.option_strings[0]}" for name, command in sub.choices.items()
               for opt in command._actions
               if opt.option_strings and opt.help in (None, "") and opt.dest != "help"]
    assert missing == []


@pytest.mark.parametrize("command,hinted", [("compress", True), ("evaluate", False)])
def test_an_idle_gpu_is_named_with_the_torchrun_command(monkeypatch, tmp_path, capsys,
                                                        command, hinted):
    """Single-process training and compression stay on the CPU; where CUDA is available,
    the log says how to use it (the command then fails here on its missing model)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [command, "--model", str(tmp_path / "gone"), "--task", "sst2"]
    if command == "compress":
        argv += ["--sparsity", "0.5", "--out", str(tmp_path / "out")]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "is not a local folder" in err
    assert ("torchrun --standalone --nproc_per_node 1 -m pgb compress" in err) == hinted


@pytest.mark.parametrize("command,setting,kept", [("compress", None, True),
                                                  ("compress", "0", False),
                                                  ("evaluate", None, False)])
def test_heavy_commands_keep_freed_memory_unless_told_not_to(monkeypatch, tmp_path, command,
                                                             setting, kept):
    """finetune/compress/run set malloc to keep freed memory (PGB_REUSE_MEMORY=0: not);
    light commands leave it alone (the command then fails here on its missing model)."""
    import pgb.bench

    calls = []
    monkeypatch.setattr(pgb.bench, "keep_freed_memory", lambda: calls.append(1) or True)
    if setting is None:
        monkeypatch.delenv("PGB_REUSE_MEMORY", raising=False)
    else:
        monkeypatch.setenv("PGB_REUSE_MEMORY", setting)
    argv = [command, "--model", str(tmp_path / "gone"), "--task", "sst2"]
    if command == "compress":
        argv += ["--sparsity", "0.5", "--out", str(tmp_path / "out")]
    assert main(["-q", *argv]) == 2
    assert calls == ([1] if kept else [])
