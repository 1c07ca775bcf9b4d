"""Handlers of the main commands: finetune, evaluate, compress, run, env.

Each takes the parsed arguments, calls the library, and returns the JSON-able result that
the CLI prints on the last line of stdout. Output folders are written atomically.
Under torchrun every rank runs the handler; only rank 0 writes the folder and returns the
result, the other ranks return None.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

from . import __version__
from . import distributed as dist
from .config import CompressConfig, TrainConfig
from .outputs import atomic_folder, check_output

log = logging.getLogger(__name__)


def task_from_args(args):
    """The Task named by --task (custom tasks built from --text-columns/--label-column)."""
    from .tasks import custom_task, get_task

    if args.task != "custom":
        return get_task(args.task), None
    if not args.train_file or not args.text_columns:
        raise ValueError("--task custom needs --train-file, --validation-file and "
                         "--text-columns (and --label-column if it is not 'label')")
    files = {"train": args.train_file}
    if args.validation_file:
        files["validation"] = args.validation_file
    cols = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    task = custom_task(cols, args.label_column,
                       kind="regression" if args.regression else "classification")
    return task, files


def _resolve_labels(task, data):
    from .data import with_data_labels

    return with_data_labels(task, data) if task.name == "custom" else task


def _versions() -> dict:
    import numpy
    import scipy
    import torch
    import transformers

    return {"pgb": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "platform": platform.platform()}


def cmd_env(args) -> dict:
    import torch

    info = _versions()
    info.update({"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                 "hf_hub_offline": __import__("os").environ.get("HF_HUB_OFFLINE")})
    for key, value in info.items():
        print(f"{key:>14}: {value}", file=sys.stderr)
    return info


def cmd_evaluate(args) -> dict:
    from .evaluation import evaluate
    from .modeling import load_task_model

    task, files = task_from_args(args)
    if task.name == "custom":
        from .data import load_split

        task = _resolve_labels(task, load_split(task, "train", files=files))
    model, tok, _ = load_task_model(args.model, task)
    return evaluate(model, task, tok, args.data_dir, split=args.split, files=files,
                    batch_size=args.batch_size, max_samples=args.max_samples,
                    progress=not args.quiet)


def cmd_finetune(args) -> dict:
    out = check_output(args.out, args.overwrite, inputs=(args.model,))
    cfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed)
    return finetune_teacher(args, cfg, out)


def finetune_teacher(args, cfg: TrainConfig, out: Path, model_name: str | None = None) -> dict:
    """Fine-tune a teacher for the task and save it (HF folder + metrics.json) at ``out``."""
    from .evaluation import evaluate
    from .finetune import set_seed, train
    from .modeling import load_task_model, load_tokenizer, resolve_model
    from .taskdata import TaskData

    task, files = task_from_args(args)
    set_seed(cfg.seed)
    tok = load_tokenizer(resolve_model(model_name or args.model))
    data = TaskData(task, tok, args.data_dir, files, args.max_length,
                    max_samples=args.max_train_samples, seed=cfg.seed)
    task = _resolve_labels(task, data.train_df)
    data.task = task
    model, tok, path = load_task_model(model_name or args.model, task)
    model.to(dist.device())
    with _main_rank_folder(out, args.overwrite) as tmp:
        log.info("fine-tuning %s on %s (%d train features) -> %s", path, task.name,
                 len(data.train), out)
        info = train(model, data.epoch_batches(cfg.batch_size, cfg.seed), cfg,
                     progress=not args.quiet)
        if tmp is None:  # not rank 0: nothing to score or write
            return None
        metrics = evaluate(model, task, tok, args.data_dir, files=files,
                           max_samples=args.max_eval_samples, progress=not args.quiet)
        model.config.pgb_task = task.name
        if task.label_names and task.kind == "classification":
            model.config.id2label = dict(enumerate(task.label_names))
            model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = {"task": task.name, "model": path, "metrics": metrics, "train": info,
                  "config": cfg.to_dict(), "max_train_samples": args.max_train_samples,
                  "max_eval_samples": args.max_eval_samples,
                  "max_length": data.length, "train_features": len(data.train),
                  "versions": _versions(), "command": " ".join(["pgb", *sys.argv[1:]])}
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2))
    log.info("teacher saved to %s: %s", out, metrics)
    return metrics


def compress_configs(args) -> list[CompressConfig]:
    """One config per --sparsity, --flops-ratio or --speedup value (several: a sweep)."""
    first = compress_config(args, 0.5 if args.sparsity is None else args.sparsity[0])
    if args.flops_ratio:  # the sparsity is solved later
        return [dataclasses.replace(first, flops_ratio=r) for r in args.flops_ratio]
    if args.speedup:
        return [dataclasses.replace(first, speedup=x) for x in args.speedup]
    return [dataclasses.replace(first, sparsity=s) for s in args.sparsity]


def compress_config(args, sparsity: float) -> CompressConfig:
    return CompressConfig(
        sparsity=sparsity, method=args.method,
        calib_samples=args.calib_samples, importance=args.importance,
        permute=not args.no_permutation,
        uniform_groups=args.uniform_groups, shared_order=args.shared_order,
        allow_drop=not args.no_drop,
        max_groups=args.max_groups, compensate=not args.no_compensation,
        refinetune=not args.no_refinetune, distill=not args.no_distill,
        refinetune_epochs=args.refinetune_epochs, refinetune_steps=args.refinetune_steps,
        refinetune_lr=args.refinetune_lr, batch_size=args.refinetune_batch_size,
        max_train_samples=args.max_train_samples,
        teacher_cache=args.teacher_cache,
        seed=args.seed, checkpoint_every=args.checkpoint_every,
        embedding_dtype=args.embedding_dtype,
        speedup_batch_size=args.speedup_batch_size,
        speedup_seq_len=args.speedup_seq_len)


def cmd_compress(args) -> dict:
    cfgs = compress_configs(args)
    # --resume does not imply --overwrite: OUT only appears once a run finished, so an
    # existing OUT is a finished result that resuming must not silently replace
    out = check_output(args.out, args.overwrite, inputs=(args.model,))
    return compress_teacher(args, cfgs, out, args.model)


def sweep_folder(cfg: CompressConfig) -> str:
    """Name of one budget's folder inside a sweep's OUT: ``s0.5``, ``s0.875`` (sparsity),
    ``f0.5`` (FLOPs ratio), ``x2`` (speed-up)."""
    if cfg.flops_ratio is not None:
        return f"f{cfg.flops_ratio:g}"
    return f"x{cfg.speedup:g}" if cfg.speedup is not None else f"s{cfg.sparsity:g}"


def compress_teacher(args, cfgs: list[CompressConfig], out: Path, teacher_path: str) -> dict:
    """Compress the teacher at ``teacher_path`` and write the compact folder at ``out``.

    Several configs (a sparsity sweep) write ``out/s<S>/`` each plus ``out/sweep.json``,
    and return ``{"sweep": [summary per budget], "seconds": total}``.
    """
    from .modeling import load_task_model
    from .pipeline import compress_sweep
    from .taskdata import TaskData

    cfg = cfgs[0]
    sweep = len(cfgs) > 1

    task, files = task_from_args(args)
    teacher, tok, path = load_task_model(teacher_path, task)
    teacher.to(dist.device())
    data = TaskData(task, tok, args.data_dir, files, cfg.max_length,
                    max_samples=cfg.max_train_samples, seed=cfg.seed)
    data.max_eval_samples = args.max_eval_samples
    data.teacher_metrics = _known_metrics(path, task, args.max_eval_samples)
    resume_dir = out.parent / f".{out.name}.resume"
    names = [sweep_folder(c) for c in cfgs] if sweep else [None]
    start = time.perf_counter()
    with _main_rank_folder(out, args.overwrite) as tmp:
        results = compress_sweep(teacher, tok, task, cfgs, data, progress=not args.quiet,
                                 checkpoint_dirs=[resume_dir / n if n else resume_dir
                                                  for n in names], resume=args.resume)
        summaries = []
        for name, c, result in zip(names, cfgs, results, strict=True):
            if tmp is None:  # not rank 0: rank 0 writes the folder
                continue
            if name:
                log.info("%s done: %s", name, result.report.get("metrics"))
            result.report.update({"teacher": path, "versions": _versions(),
                                  "command": " ".join(["pgb", *sys.argv[1:]]),
                                  "world_size": dist.world()})
            folder = tmp / name if name else tmp
            folder.mkdir(exist_ok=True)
            _save_result(result, tok, folder, task, c)
            summaries.append(_summary(result.report))
        if tmp is None:
            return None
        seconds = time.perf_counter() - start
        if sweep:
            record = {"sweep": summaries, "folders": names, "seconds": seconds}
            (tmp / "sweep.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(resume_dir, ignore_errors=True)  # the output is in place: nothing to resume
    return record if sweep else summaries[0]


def _save_result(result, tok, folder: Path, task, cfg: CompressConfig) -> None:
    """The model in the format of its method, its report.json and config.pgb.json."""
    from .checkpoint import save_compact

    if hasattr(result.model, "pgb_recipe"):
        save_compact(result.model, tok, folder)
    elif hasattr(result.model, "pgb_structure"):
        from .structured import save_structured

        save_structured(result.model, tok, folder)
    else:
        _save_plain(result.model, tok, folder, task)
    (folder / "report.json").write_text(json.dumps(result.report, indent=2))
    (folder / "config.pgb.json").write_text(json.dumps(cfg.to_dict(), indent=2))


@contextlib.contextmanager
def _main_rank_folder(out: Path, overwrite: bool):
    """Rank 0: an atomic output folder with pgb's log mirrored into it. Other ranks: None.

    Single-process this is ``atomic_folder`` + ``mirror_log``. Under torchrun the ranks
    enter together (so every rank has checked ``out`` before rank 0 creates anything) and
    leave together once the folder is in place (so a later stage may read it on any rank).
    """
    from .cli import mirror_log

    dist.barrier()
    if dist.is_main():
        with atomic_folder(out, overwrite) as tmp, mirror_log(tmp):
            yield tmp
    else:
        yield None
    dist.barrier()


def _known_metrics(teacher_path: str, task, max_eval_samples: int | None = None) -> dict | None:
    """The teacher's dev metrics from its pgb metrics.json (same task, default split, same
    dev subset)."""
    record = Path(teacher_path) / "metrics.json"
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if data.get("task") != task.name or task.name == "custom" or "metrics" not in data:
        return None
    if data.get("max_eval_samples") != max_eval_samples:  # scored on another dev subset
        return None
    log.info("teacher metrics taken from %s", record)
    return data["metrics"]


def _save_plain(model, tok, folder: Path, task) -> None:
    """Methods whose result is a plain transformers model (magnitude)."""
    model.config.pgb_task = task.name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _summary(report: dict) -> dict:
    keys = ("method", "target_sparsity", "target_flops_ratio", "target_speedup",
            "planned_speedup", "achieved_sparsity",
            "params_before", "params_after", "flops_ratio", "stage_seconds",
            "dropped_sublayers", "teacher_metrics", "metrics")
    return {k: report[k] for k in keys if k in report}


def cmd_run(args) -> dict:
    """Fine-tune the teacher when needed, compress, evaluate, and summarise side by side."""
    from .modeling import is_tuned_for

    task, _ = task_from_args(args)
    out = check_output(args.out, args.overwrite, inputs=(args.model,))
    cfgs = compress_configs(args)
    teacher = args.model
    if teacher is None or not is_tuned_for(teacher, task):
        teacher_dir = out.parent / f"{out.name}-teacher"
        if teacher_dir.exists() and is_tuned_for(str(teacher_dir), task):
            log.info("reusing the teacher at %s", teacher_dir)
        else:
            tcfg = TrainConfig(epochs=args.teacher_epochs, seed=args.seed + 42)
            args.max_train_samples_backup = args.max_train_samples
            args.max_train_samples = args.teacher_max_train_samples
            args.max_length = 128
            finetune_teacher(args, tcfg, check_output(teacher_dir, args.overwrite))
            args.max_train_samples = args.max_train_samples_backup
        teacher = str(teacher_dir)
    summary = compress_teacher(args, cfgs, out, teacher)
    if summary is not None:  # None on the ranks other than 0
        for one in summary.get("sweep", [summary]):
            _print_side_by_side(one)
    return summary


def _print_side_by_side(s: dict) -> None:
    t, m = s.get("teacher_metrics", {}), s.get("metrics", {})
    rows = [("sparsity", 0.0, s.get("target_sparsity")),
            ("params", s.get("params_before"), s.get("params_after")),
            ("encoder FLOPs (rel.)", 1.0, round(s.get("flops_ratio", float("nan")), 3))]
    if s.get("planned_speedup") is not None:
        rows.append(("speed-up (planned)", 1.0, round(s["planned_speedup"], 2)))
    rows += [(k, round(t[k], 4), round(m.get(k, float("nan")), 4)) for k in t if k in m
             and k != "samples"]
    print(f"{'':>22} {'teacher':>12} {'compressed':>12}", file=sys.stderr)
    for name, a, b in rows:
        print(f"{name:>22} {a!s:>12} {b!s:>12}", file=sys.stderr)
