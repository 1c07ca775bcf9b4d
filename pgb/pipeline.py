"""The compression pipeline, one call per stage, reading like the method:

importance -> grouping -> allocation -> masking + compensation -> compact surgery ->
re-finetuning (distillation) -> evaluation.

Example::

    >>> teacher, tok, _ = load_task_model("runs/sst2-teacher", get_task("sst2"))
    >>> result = compress(teacher, tok, get_task("sst2"), CompressConfig(sparsity=0.5))
    >>> result.report["achieved_sparsity"]
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .allocation import allocate, retained_importance
from .arch import SUBLAYERS, dims_of, get_arch
from .checkpoint import round_embeddings
from .compensate import apply_masks, compensate
from .config import CompressConfig
from .distributed import from_main, is_main, world
from .evaluation import evaluate
from .finetune import train
from .flops import count_params, flops_ratio, plan_flops_ratio, sparsity_for_flops
from .grouping import candidate_groups, orient, search_sublayer
from .importance import importance_scores
from .latency import sparsity_for_speedup
from .surgery import to_compact
from .taskdata import TaskData
from .tasks import Task
from .trace import TeacherTrace

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """The compressed model, its recipe (None for methods without one) and the report."""

    model: nn.Module
    report: dict


def search_groupings(scores: dict[str, torch.Tensor], model: nn.Module, cfg: CompressConfig,
                     progress: bool = True, cache: dict | None = None,
                     workers: int | None = None) -> dict:
    """Grouping search for every sublayer and candidate group count.

    ``cache`` (a dict, filled here) keeps each search by sublayer and G, so the budgets of a
    sweep search every (sublayer, G) once: the search does not depend on the sparsity.

    The searches are independent, single-threaded Python and NumPy: ``workers`` processes
    (default: torch's thread count, one where fork is unavailable or under
    ``torch.distributed``, whose ranks already share the cores) run the sublayers side by
    side, each returning exactly what a serial search finds.
    """
    dims, spec = dims_of(model), get_arch(model)
    cache = {} if cache is None else cache
    units = [(layer, kind) for layer in range(dims.layers) for kind in SUBLAYERS]
    cands, searched, jobs = {}, [], []  # jobs: the searches still to run, per sublayer
    for layer, kind in units:
        cands[(layer, kind)] = candidate_groups(kind, dims, cfg.max_groups)
        if cfg.uniform_groups:
            cands[(layer, kind)] = [g for g in cands[(layer, kind)] if g == cfg.uniform_g()]
        todo = [g for g in cands[(layer, kind)] if (layer, kind, g) not in cache]
        if todo:
            sc = {r: orient(r, scores[f"{layer}.{r}"].numpy()) for r in SUBLAYERS[kind]}
            searched.append((layer, kind))
            jobs.append((sc, todo, dict(
                heads=dims.heads if kind == "attn" else None,
                fixed_head_order=spec.fixed_head_order, iters=cfg.search_iters,
                permute=cfg.permute, shared_outer=cfg.shared_order)))
    for unit, found in zip(searched, _run_searches(jobs, workers, progress), strict=True):
        for g, grouping in found.items():
            cache[(*unit, g)] = grouping
    return {u: {g: cache[(*u, g)] for g in cands[u]} for u in units}


def _search_unit(args: tuple) -> dict:
    """Every candidate G of one sublayer: ``args`` = (scores, group counts, options)."""
    sc, groups, options = args
    return {g: search_sublayer(sc, g, **options) for g in groups}


def _run_searches(jobs: list[tuple], workers: int | None, progress: bool) -> list[dict]:
    """``_search_unit`` of each job, in order: in ``workers`` forked processes, else here.
    Where the workers fail (a fork refused, a worker killed), this process searches the
    sublayers they did not return."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if workers is None:
        fork = "fork" in multiprocessing.get_all_start_methods()
        workers = torch.get_num_threads() if fork and world() == 1 else 1
    workers = min(workers, len(jobs))
    found: list[dict] = []
    with tqdm(total=len(jobs), desc="grouping", disable=not progress) as bar:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            try:
                for one in pool.map(_search_unit, jobs):
                    found.append(one)
                    bar.update(1)
            except (BrokenProcessPool, OSError) as err:
                log.warning("grouping worker processes failed (%s); searching the remaining "
                            "sublayers in this process", err)
            finally:
                pool.shutdown(cancel_futures=True)
        for job in jobs[len(found):]:
            found.append(_search_unit(job))
            bar.update(1)
    return found


def shared_key(cfg: CompressConfig) -> tuple:
    """What the sparsity-independent stages depend on: budgets of a sweep may share them
    only when these settings agree (``compress_sweep`` checks it)."""
    fields = ("method", "calib_samples", "calib_batch_size", "importance", "normalize",
              "permute", "shared_order", "max_groups", "search_iters", "max_length", "seed")
    return tuple(getattr(cfg, f) for f in fields)


def shared_stage(shared: dict | None, name: str, compute):
    """``compute()``, or its value from an earlier budget of the same sweep (``shared``)."""
    if shared is None:
        return compute()
    if name not in shared:
        shared[name] = compute()
    return shared[name]


def run_method(teacher: nn.Module, tokenizer, task: Task, cfg: CompressConfig, data: TaskData,
               progress: bool = True, checkpoint_dir=None, resume: bool = False,
               shared: dict | None = None) -> CompressResult:
    """Compress with ``cfg.method`` (pgb or a baseline); resumable re-finetuning.

    ``shared``: a dict that carries the sparsity-independent stages (importance scores,
    grouping searches, structured's mask Fisher) from one budget of a sweep to the next.
    """
    if cfg.method == "pgb":
        return compress(teacher, tokenizer, task, cfg, data, progress=progress,
                        checkpoint_dir=checkpoint_dir, resume=resume, shared=shared)
    from .baselines import compress_baseline

    return compress_baseline(teacher, tokenizer, task, cfg, data, progress=progress,
                             checkpoint_dir=checkpoint_dir, resume=resume, shared=shared)


def compress_sweep(teacher: nn.Module, tokenizer, task: Task, cfgs: list[CompressConfig],
                   data: TaskData, progress: bool = True, checkpoint_dirs=None,
                   resume: bool = False):
    """Compress at several budgets, computing the sparsity-independent stages once.

    Yields one ``CompressResult`` per config, in order; the configs must differ only in
    their sparsity. The teacher is scored once. Each report's ``stage_seconds`` holds what
    that budget spent itself (the reused stages show only the allocation's share).
    """
    if len({shared_key(c) for c in cfgs}) != 1:
        raise ValueError("the budgets of a sweep must share every setting but the sparsity")
    shared: dict = {}
    data.share_teacher_outputs = len(cfgs) > 1  # every budget distils on the same batches
    for i, cfg in enumerate(cfgs):
        result = run_method(teacher, tokenizer, task, cfg, data, progress=progress,
                            checkpoint_dir=checkpoint_dirs[i] if checkpoint_dirs else None,
                            resume=resume, shared=shared)
        if data.teacher_metrics is None and "teacher_metrics" in result.report:
            data.teacher_metrics = result.report["teacher_metrics"]  # score it once
        yield result


def compress(teacher: nn.Module, tokenizer, task: Task, cfg: CompressConfig, data: TaskData,
             evaluate_models: bool = True, progress: bool = True, checkpoint_dir=None,
             resume: bool = False, shared: dict | None = None) -> CompressResult:
    """Compress a fine-tuned ``teacher`` with PGB; the teacher is left untouched.

    ``shared``: see ``run_method`` (scores and grouping searches reused across budgets).
    """
    teacher.eval()
    seconds: dict[str, float] = {}
    clock = _Clock(seconds)
    # every rank holds the whole sample; importance and compensation each take their shard
    calib = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed)
    with clock("importance"):  # (and the teacher's activations compensation needs)
        scores, trace = shared_stage(shared, "scores",
                                     lambda: _scores(teacher, calib, cfg, progress))
    with clock("grouping"):
        searches = shared_stage(shared, "searches", dict)
        groupings = search_groupings(scores, teacher, cfg, progress, cache=searches)
    with clock(budget_stage(cfg)):
        cfg, budget = budget_sparsity(
            cfg, lambda s: _allocate(groupings, teacher, cfg, s),
            lambda recipe: to_compact(copy.deepcopy(teacher), recipe), teacher)
    recipe = _allocate(groupings, teacher, cfg, cfg.sparsity)
    student = copy.deepcopy(teacher)
    with clock("compensation"):
        apply_masks(student, recipe)
        if cfg.compensate:
            # the same sample, batched by length: token sums, less padding to run through
            by_length = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed,
                                         by_length=True)
            compensate(student, teacher, recipe, by_length, cfg.damping, progress,
                       cfg.compensation_target, cfg.compensation_prior, trace)
    del trace  # ~1 GB on MRPC: not held through re-finetuning (a sweep's ``shared`` keeps it)
    to_compact(student, recipe)
    before = dev_metrics(student, task, tokenizer, data, progress) \
        if evaluate_models and cfg.refinetune else None
    with clock("refinetune"):
        train_info = refinetune(student, teacher, data, cfg, progress, checkpoint_dir, resume)
    round_embeddings(student, cfg.embedding_dtype)  # before evaluation: metrics as saved
    report = {
        "method": "pgb", "target_sparsity": cfg.sparsity, "target_flops_ratio": cfg.flops_ratio,
        **budget, "achieved_sparsity": recipe.sparsity(),
        "params_before": count_params(teacher), "params_after": count_params(student),
        "flops_ratio": flops_ratio(student, teacher),
        "stage_seconds": seconds, "matrices": retained_importance(recipe, groupings),
        "groups": {f"{p.layer}.{p.kind}": p.groups for p in recipe.sublayers},
        "dropped_sublayers": recipe.dropped_sublayers(), "refinetune": train_info,
        "config": cfg.to_dict(), "pgb_version": __version__, "task": task.name,
    }
    if evaluate_models:
        add_metrics(report, teacher, student, task, tokenizer, data, progress, before)
    return CompressResult(student, report)


def _allocate(groupings: dict, teacher: nn.Module, cfg: CompressConfig, sparsity: float):
    recipe = allocate(groupings, dims_of(teacher), teacher.config.model_type, sparsity,
                      uniform=cfg.uniform_g() if cfg.uniform_groups else None,
                      allow_drop=cfg.allow_drop and not cfg.uniform_groups,
                      objective=cfg.allocation)
    if cfg.shared_order:  # the compact model keeps the residual stream permuted
        recipe = dataclasses.replace(recipe, meta={**recipe.meta, "shared_order": True})
        recipe.validate()
    return recipe


def quiet_plan(plan_at, sparsity: float):
    """``plan_at(sparsity)`` (a Recipe or Structure) without the allocator's warnings, or
    None where no plan can be made (coarse blocks): a budget's probes far off the answer
    may miss their sparsity."""
    quiet = logging.getLogger("pgb.allocation")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return plan_at(sparsity)
    except ValueError:
        return None
    finally:
        quiet.setLevel(level)


def for_flops(plan_at, target: float) -> float:
    """The sparsity at which ``plan_at(sparsity)`` (a Recipe or Structure) meets FLOPs ratio
    ``target`` (see ``pgb.flops.sparsity_for_flops``); logged."""
    def ratio_at(sparsity: float) -> float:
        plan = quiet_plan(plan_at, sparsity)
        return float("inf") if plan is None else plan_flops_ratio(plan)

    sparsity = sparsity_for_flops(ratio_at, target)
    log.info("FLOPs ratio %g: sparsity %.4f", target, sparsity)
    return sparsity


def for_speedup(plan_at, build, teacher: nn.Module, cfg: CompressConfig) -> tuple[float, float]:
    """(sparsity, measured speed-up) at which ``build(plan_at(sparsity))``, the physically
    smaller model, runs ``cfg.speedup`` times as fast as ``teacher`` (see ``pgb.latency``).
    Under torchrun, rank 0 measures and the others take its answer (their timings would
    differ, and so would their models)."""
    def build_at(sparsity: float):
        plan = quiet_plan(plan_at, sparsity)
        return None if plan is None else build(plan)

    return from_main(lambda: sparsity_for_speedup(
        build_at, teacher, cfg.speedup, cfg.speedup_batch_size, cfg.speedup_seq_len,
        cfg.method))


def budget_stage(cfg: CompressConfig) -> str:
    """The stage_seconds entry that solving the budget counts under: its own for a speed-up
    (each probe is timed), the grouping's otherwise (FLOPs are counted in milliseconds)."""
    return "speedup_search" if cfg.speedup is not None else "grouping"


def budget_sparsity(cfg: CompressConfig, plan_at, build, teacher: nn.Module
                    ) -> tuple[CompressConfig, dict]:
    """``cfg`` with its sparsity solved from a FLOPs or speed-up budget (unchanged for a
    sparsity budget), and the report entries the budget adds."""
    if cfg.flops_ratio is not None:
        return dataclasses.replace(cfg, sparsity=for_flops(plan_at, cfg.flops_ratio)), {}
    if cfg.speedup is None:
        return cfg, {}
    sparsity, measured = for_speedup(plan_at, build, teacher, cfg)
    return dataclasses.replace(cfg, sparsity=sparsity), {
        "target_speedup": cfg.speedup, "planned_speedup": measured,
        "speedup_shape": [cfg.speedup_batch_size, cfg.speedup_seq_len]}


def _scores(teacher: nn.Module, calib: list[dict], cfg: CompressConfig, progress: bool
            ) -> tuple[dict[str, torch.Tensor], TeacherTrace | None]:
    """Importance scores and, where compensation will use it, the teacher's trace recorded
    in the same passes (single process: under torch.distributed the importance and
    compensation shards hold different examples)."""
    trace = TeacherTrace(teacher) if cfg.compensate and world() == 1 and \
        cfg.compensation_target == "stream" else None
    scores = importance_scores(teacher, calib, cfg.importance, progress, trace)
    if cfg.normalize == "mean":
        scores = {n: s / s.mean().clamp_min(1e-30) for n, s in scores.items()}
    return scores, trace


def dev_metrics(model: nn.Module, task: Task, tokenizer, data: TaskData,
                progress: bool = True) -> dict | None:
    """Dev metrics of ``model`` (None on ranks other than 0: rank 0 scores, the others wait)."""
    if not is_main():
        return None
    return evaluate(model, task, tokenizer, data.data_dir, files=data.files,
                    max_samples=data.max_eval_samples, progress=progress)


def add_metrics(report: dict, teacher, student, task: Task, tokenizer, data: TaskData,
                progress: bool, before: dict | None = None) -> None:
    """Teacher and student dev metrics into ``report`` (and the student's before re-finetuning).

    The teacher's metrics come from ``data.teacher_metrics`` when the caller knows them
    (the teacher folder's metrics.json), else they are computed.
    """
    if not is_main():
        return
    report["teacher_metrics"] = data.teacher_metrics or dev_metrics(teacher, task, tokenizer,
                                                                    data, progress)
    report["metrics"] = dev_metrics(student, task, tokenizer, data, progress)
    if before is not None:
        report["metrics_before_refinetune"] = before


def refinetune(student, teacher, data: TaskData, cfg: CompressConfig, progress: bool = True,
               checkpoint_dir=None, resume: bool = False) -> dict:
    """Re-finetune the compressed student (distilling from the teacher unless disabled)."""
    if not cfg.refinetune:
        return {"steps": 0}
    tcfg = cfg.train_config()
    if not cfg.distill:
        return train(student, data.epoch_batches(tcfg.batch_size, tcfg.seed), tcfg,
                     progress=progress, checkpoint_dir=checkpoint_dir, resume=resume)
    outputs = data.teacher_outputs(teacher, cfg.teacher_cache)
    hits, misses = outputs.hits, outputs.misses
    info = train(student, data.epoch_batches(tcfg.batch_size, tcfg.seed), tcfg,
                 teacher=outputs, progress=progress, checkpoint_dir=checkpoint_dir,
                 resume=resume)
    if is_main():
        outputs.save()
    info["teacher_cache"] = {"hits": outputs.hits - hits, "misses": outputs.misses - misses,
                             "file": None if outputs.path is None else str(outputs.path)}
    return info


class _Clock:
    """``with clock("stage"):`` adds the stage's wall time to ``seconds``."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds

    def __call__(self, stage: str):
        self.stage = stage
        return self

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + elapsed
        log.info("stage %s: %.1f s", self.stage, elapsed)
