"""The benchmark campaign: compress every (task, sparsity, method, re-finetune) point and bench it.

For each task, method and re-finetuning the runner calls the CLI, exactly as a person
would: one sparsity sweep (importance scores and grouping searches computed once; each
budget's model is the one its single run writes), whose budget folders then move to
``<runs>/<name>``; then one bench of all the task's models against its teacher::

    pgb -q compress --model <teacher> --task <task> --data-dir <data> --sparsity S1,S2,S3 \
        --out <runs>/<sweep name> [variant flags] [--no-refinetune] \
        [--teacher-cache <runs>/teacher-cache]
    pgb -q bench --model <runs>/<name 1> --model <runs>/<name 2> ... --baseline <teacher> \
        --batch-size B --seq-len L --threads T

and writes one JSON per run to ``<results>/<name>.json`` (schema in benchmarks/README.md).
Tables and plots come from those files alone (``benchmarks/make_results.py``).
Re-finetuning runs share the teacher's outputs through ``--teacher-cache`` (the same
batches in every run of a task: the teacher runs forward once per task, results
unchanged). ``--no-sweep`` makes one compress command per run (``--sparsity S``,
``--out <runs>/<name>``).

- One bench per task and re-finetuning: the teacher and every model of the task are timed
  in the same interleaved rounds, so all its speed-ups (PGB's and its structured twin's,
  recorded as ``structured_*`` in each PGB run) see the same machine load, and the teacher
  is timed once instead of once per run. A structured twin made by an earlier campaign is
  timed with them.
- Resumable: a run whose result JSON exists is skipped (``--force`` re-runs everything,
  ``--retry-failed`` re-runs the failed ones); a finished compress folder is reused, so a
  run interrupted while benching only benches again.
- A failing run is recorded (``"error"`` and the stderr tail) and the campaign goes on.
- Order: no-re-finetune runs first (minutes each: a quick full picture), then re-finetuned
  ones; inside a task, ``structured`` first.
- A sweep's command time is shared out evenly over its runs' ``wall_seconds``, and so is
  the task's bench; its later budgets record ``shared_prune_seconds`` (the first budget's
  importance + grouping), which ``make_results`` adds to their prune + compensate time:
  what each would spend alone.

Usage: ``python benchmarks/campaign.py --tasks mrpc --sparsities 0.5 --methods pgb,structured``
(``--dry-run`` prints the commands only, and the time they are projected to take from the
runs on record). Run names look like ``minilm-sst2-pgb-s0.875-rft``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pgb.tasks import get_task  # noqa: E402  (light: no torch)

# variant -> (pgb compress --method, extra flags). Ablations switch off one part of PGB.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pgb": ("pgb", ()),
    "pgb-noperm": ("pgb", ("--no-permutation",)),
    "pgb-uniform": ("pgb", ("--uniform-groups",)),
    "pgb-nocomp": ("pgb", ("--no-compensation",)),
    "pgb-shared": ("pgb", ("--shared-order",)),
    "structured": ("structured", ("--method", "structured")),
    "magnitude": ("magnitude", ("--method", "magnitude")),
}
ORDER = ("structured", "magnitude", "pgb", "pgb-shared", "pgb-noperm", "pgb-uniform",
         "pgb-nocomp")
DEFAULT_TEACHERS = ROOT / "runs" / "teachers"  # where benchmarks/teachers.sh writes
# report.json fields kept in the result JSON ("matrices" is large and stays in the run folder)
REPORT_KEYS = ("method", "target_sparsity", "achieved_sparsity", "params_before",
               "params_after", "flops_ratio", "stage_seconds", "dropped_sublayers", "groups",
               "teacher_metrics", "metrics", "metrics_before_refinetune", "compensation",
               "config", "command")
TAIL_CHARS = 4000


@dataclass(frozen=True)
class Run:
    """One point of the grid."""

    tag: str
    task: str
    sparsity: float
    variant: str
    refinetune: bool

    @property
    def name(self) -> str:
        """E.g. ``minilm-sst2-pgb-s0.875-rft`` (``-nrft`` without re-finetuning)."""
        rft = "rft" if self.refinetune else "nrft"
        return f"{self.tag}-{self.task}-{self.variant}-s{self.sparsity:g}-{rft}"

    @property
    def method(self) -> str:
        return VARIANTS[self.variant][0]

    def structured_twin(self) -> Run:
        """The structured run at the same task, sparsity and re-finetuning budget."""
        return Run(self.tag, self.task, self.sparsity, "structured", self.refinetune)


@dataclass(frozen=True)
class Settings:
    """Paths and bench settings shared by every run (absolute paths)."""

    teachers: Path
    runs: Path
    results: Path
    data_dir: Path
    model: str | None
    batch: int
    seq: int
    threads: int
    seed: int | None
    compress_args: tuple[str, ...]
    bench_args: tuple[str, ...]
    teacher_cache: Path | None = None  # --teacher-cache of every re-finetuning compress


def plan(tag: str, tasks: list[str], sparsities: list[float], variants: list[str],
         refinetune: list[bool]) -> list[Run]:
    """Every run of the grid in execution order (see the module docstring)."""
    ranked = sorted(variants, key=ORDER.index)
    return [Run(tag, task, s, v, rft) for rft in refinetune for task in tasks
            for s in sparsities for v in ranked]


def show(path: Path | str) -> str:
    """A path as printed in commands: relative to the repository root when inside it."""
    path = Path(path)
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def compress_cmd(run: Run, teacher: Path, out: Path, cfg: Settings, overwrite: bool = False,
                 resume: bool = False, sparsities: list[float] | None = None) -> list[str]:
    """``pgb compress`` for ``run``, or for a sweep over ``sparsities`` (its other settings
    those of ``run``)."""
    budgets = ",".join(f"{s:g}" for s in sparsities or [run.sparsity])
    cmd = ["pgb", "-q", "compress", "--model", show(teacher), "--task", run.task,
           "--data-dir", show(cfg.data_dir), "--sparsity", budgets,
           "--out", show(out), *VARIANTS[run.variant][1]]
    cmd += [] if run.refinetune else ["--no-refinetune"]
    if run.refinetune and cfg.teacher_cache is not None:
        cmd += ["--teacher-cache", show(cfg.teacher_cache)]
    cmd += [] if cfg.seed is None else ["--seed", str(cfg.seed)]
    cmd += ["--overwrite"] if overwrite else (["--resume"] if resume else [])
    return cmd + list(cfg.compress_args)


def bench_cmd(outs: list[Path], teacher: Path, cfg: Settings) -> list[str]:
    """One ``pgb bench`` of every folder in ``outs`` against the teacher, in the same
    interleaved rounds."""
    cmd = ["pgb", "-q", "bench"]
    for out in outs:
        cmd += ["--model", show(out)]
    cmd += ["--baseline", show(teacher), "--batch-size", str(cfg.batch), "--seq-len",
            str(cfg.seq), "--threads", str(cfg.threads)]
    return cmd + list(cfg.bench_args)


def bench_folders(runs: list[Run], cfg: Settings, planned: set[str] | None = None) -> list[Path]:
    """The folders one task's bench times: its runs, then the structured twins of its PGB
    runs that are not among them but exist (made by an earlier campaign) or are ``planned``
    (run names)."""
    twins = [structured_for(r, cfg, planned or set()) for r in runs]
    return list(dict.fromkeys([cfg.runs / r.name for r in runs] +
                              [t for t in twins if t is not None]))


def builds_teachers(cfg: Settings) -> bool:
    """Whether benchmarks/teachers.sh makes this campaign's missing teachers: only the
    default MiniLM teachers, in the default folder."""
    return cfg.model is None and cfg.teachers.resolve() == DEFAULT_TEACHERS.resolve()


def teacher_cmd(task: str, cfg: Settings) -> list[str]:
    """How a missing teacher is made; only the default MiniLM teachers can be built here."""
    if not builds_teachers(cfg):
        raise FileNotFoundError(
            f"no teacher at {cfg.teachers / task}; benchmarks/teachers.sh only builds the "
            f"MiniLM teachers under runs/teachers. Fine-tune one with `pgb finetune --model "
            f"{cfg.model or 'MODEL'} --task {task} --out {cfg.teachers / task}`")
    return ["bash", "benchmarks/teachers.sh", task]


# ---------------------------------------------------------------- result records


def select_report(report: dict, task: str) -> dict:
    """The report.json fields the tables need, plus the task's main metric and its ratio."""
    out = {k: report[k] for k in REPORT_KEYS if k in report}
    main = get_task(task).main_metric
    value = (report.get("metrics") or {}).get(main)
    teacher = (report.get("teacher_metrics") or {}).get(main)
    out.update({"main_metric": main, "main_value": value, "teacher_main_value": teacher,
                "ratio_to_teacher": value / teacher if value is not None and teacher else None,
                "refinetune_steps": (report.get("refinetune") or {}).get("steps")})
    return out


def base_model(cfg: Settings, teacher: Path) -> str | None:
    """The checkpoint the teacher was fine-tuned from (``--model``, else its metrics.json)."""
    metrics = teacher / "metrics.json"
    if cfg.model is None and metrics.is_file():
        return json.loads(metrics.read_text()).get("model")
    return cfg.model


def base_record(run: Run, cfg: Settings, teacher: Path) -> dict:
    return {"name": run.name, "model": base_model(cfg, teacher), "teacher": show(teacher),
            "task": run.task,
            "method": run.method, "variant": run.variant, "sparsity": run.sparsity,
            "refinetune": run.refinetune, "seed": cfg.seed, "commands": []}


def write_json(path: Path, record: dict) -> None:
    """Write atomically: a campaign killed mid-write leaves no half file to skip over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


class RunFailed(RuntimeError):
    """A command exited non-zero; carries the tail of its stderr."""

    def __init__(self, cmd: list[str], rc: int, stderr: str):
        super().__init__(f"`{' '.join(cmd[:3])}` exited with status {rc}")
        self.stderr_tail = stderr[-TAIL_CHARS:]


def call(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` from the repository root; return its stdout or raise :class:`RunFailed`."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RunFailed(cmd, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def last_json(stdout: str) -> dict:
    """The JSON object on the last non-empty stdout line (the CLI's convention)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the command printed nothing on stdout; expected a JSON line")
    return json.loads(lines[-1])


def ensure_teacher(task: str, cfg: Settings, cache: dict[str, str | None]) -> None:
    """Build a missing teacher once per campaign; a failure is remembered per task."""
    if (cfg.teachers / task).is_dir():
        return
    if task not in cache:
        try:
            env = {**os.environ, "PGB_DATA_DIR": str(cfg.data_dir)}
            call(teacher_cmd(task, cfg), env=env)
            cache[task] = None
        except (RunFailed, FileNotFoundError) as err:
            cache[task] = f"teacher: {err}\n{getattr(err, 'stderr_tail', '')}"
    if cache[task]:
        raise RuntimeError(cache[task])


def sweeps(runs: list[Run], sweep: bool = True) -> list[list[Run]]:
    """The runs grouped by compress command, in execution order: one command per task,
    method and re-finetuning, a sparsity sweep when it has several budgets to make
    (``sweep=False``: one command per run)."""
    if not sweep:
        return [[run] for run in runs]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.refinetune, run.task, run.variant), []).append(run)
    return list(groups.values())


def sweep_out(runs: list[Run], cfg: Settings) -> Path:
    """Where a sweep writes before its budget folders move to their runs' folders:
    ``<runs>/<tag>-<task>-<method>-sweep-<rft|nrft>``."""
    first = runs[0]
    rft = "rft" if first.refinetune else "nrft"
    return cfg.runs / f"{first.tag}-{first.task}-{first.variant}-sweep-{rft}"


def group_cmd(runs: list[Run], teacher: Path, cfg: Settings, force: bool) -> list[str]:
    """The one compress command that makes ``runs`` (the same task, method and
    re-finetuning)."""
    if len(runs) == 1:
        out, name = cfg.runs / runs[0].name, runs[0].name
    else:
        out = sweep_out(runs, cfg)
        name = out.name
    resume = (cfg.runs / f".{name}.resume").is_dir() and not force
    overwrite = out.exists() and (force or len(runs) > 1)  # a sweep folder is ours to redo
    return compress_cmd(runs[0], teacher, out, cfg, overwrite=overwrite, resume=resume,
                        sparsities=[r.sparsity for r in runs] if len(runs) > 1 else None)


def compress_group(runs: list[Run], cmd: list[str], cfg: Settings) -> None:
    """Run ``cmd``, the compress command of ``runs``; a sweep's budget folders then move to
    their runs' folders (``<runs>/<run name>``, as a single run writes), each with a copy of
    the sweep's own files (its ``log.txt`` and ``sweep.json``) under ``sweep/``."""
    call(cmd)
    if len(runs) > 1:
        out = sweep_out(runs, cfg)
        shared = [f for f in out.iterdir() if f.is_file()]
        for run in runs:
            dest = cfg.runs / run.name
            if dest.exists():  # --force: the campaign's own earlier output
                shutil.rmtree(dest)
            os.replace(out / f"s{run.sparsity:g}", dest)
            (dest / "sweep").mkdir()
            for f in shared:
                shutil.copy2(f, dest / "sweep" / f.name)
        shutil.rmtree(out)


def shared_prune_seconds(report: dict) -> float:
    """Seconds of the stages a sweep computes once (importance scores, grouping searches),
    from its first budget's report: what each later budget would spend alone."""
    stages = report.get("stage_seconds") or {}
    return round(sum(stages.get(k) or 0.0 for k in ("importance", "grouping")), 1)


def blocks(runs: list[Run], sweep: bool = True) -> list[list[list[Run]]]:
    """The compress commands (:func:`sweeps`) grouped by task and re-finetuning, in
    execution order: each block's models are benched together once its commands ran."""
    out: dict[tuple, list[list[Run]]] = {}
    for group in sweeps(runs, sweep):
        out.setdefault((group[0].refinetune, group[0].task), []).append(group)
    return list(out.values())


def compress_step(runs: list[Run], cfg: Settings, force: bool,
                  teacher_errors: dict) -> list[dict]:
    """Compress ``runs`` with one command (reusing finished folders); returns their records
    (with the report, or the error), ``wall_seconds`` their share of the command."""
    start = time.time()
    teacher = cfg.teachers / runs[0].task
    records = [base_record(run, cfg, teacher) for run in runs]
    todo = [r for r in runs if force or not (cfg.runs / r.name / "report.json").is_file()]
    cmd = group_cmd(todo, teacher, cfg, force) if todo else []
    try:
        ensure_teacher(runs[0].task, cfg, teacher_errors)
        if todo:
            compress_group(todo, cmd, cfg)
    except Exception as err:  # any failure is recorded and the campaign goes on
        for run, record in zip(runs, records, strict=True):
            record["commands"] = [shlex.join(cmd)] if run in todo else []
            failed(record, err)
            record["wall_seconds"] = (time.time() - start) / len(runs)
        return records
    share = (time.time() - start) / len(todo) if todo else 0.0
    first: dict | None = None
    for run, record in zip(runs, records, strict=True):
        record["model"] = base_model(cfg, teacher)
        record["wall_seconds"] = share if run in todo else 0.0
        try:
            report = json.loads((cfg.runs / run.name / "report.json").read_text())
        except Exception as err:
            failed(record, err)
            continue
        if run in todo:
            record["commands"].append(shlex.join(cmd))
            if len(todo) > 1:
                record["sweep"] = [r.sparsity for r in todo]
                if first is not None:
                    record["shared_prune_seconds"] = shared_prune_seconds(first)
                first = first or report
        else:
            record["reused_compress_output"] = True
        record["versions"] = report.get("versions")
        record["report"] = select_report(report, run.task)
        if record["seed"] is None:
            record["seed"] = (report.get("config") or {}).get("seed")
    return records


def bench_step(runs: list[Run], records: list[dict], cfg: Settings) -> float:
    """Bench the compressed ``runs`` of one task in one ``pgb bench`` (the teacher and every
    model timed in the same interleaved rounds, so all the task's speed-ups see the same
    machine load) and add each run's figures, with its structured twin's, to its record.
    Returns the seconds the bench took."""
    from pgb.bench import with_structured  # imports torch: only when benching

    ok = [(run, rec) for run, rec in zip(runs, records, strict=True) if "error" not in rec]
    if not ok:
        return 0.0
    start = time.time()
    outs = bench_folders([run for run, _ in ok], cfg)
    cmd = bench_cmd(outs, cfg.teachers / runs[0].task, cfg)
    load = list(os.getloadavg())
    try:
        out = last_json(call(cmd))
        models = out.get("models") or {show(outs[0]): out}  # one model: the flat object
        extra = {k: out[k] for k in ("reuse_memory", "compile_backend") if k in out}
        for run, rec in ok:
            rec["commands"].append(shlex.join(cmd))
            rec["loadavg_before_bench"] = load
            bench = models[show(cfg.runs / run.name)]
            twin = structured_for(run, cfg, set())
            if twin is not None and show(twin) in models:
                bench = with_structured(bench, models[show(twin)])
            rec["bench"] = {**bench, **extra}
    except Exception as err:
        for _, rec in ok:
            failed(rec, err)
    return time.time() - start


def execute(block: list[list[Run]], cfg: Settings, force: bool,
            teacher_errors: dict) -> list[tuple[Run, dict]]:
    """Compress one task's runs (one command per group of ``block``), bench them together,
    and return their result records. Each run's ``wall_seconds`` is its share of its
    compress command plus its share of the bench."""
    done: list[tuple[Run, dict]] = []
    for group in block:
        records = compress_step(group, cfg, force, teacher_errors)
        seconds = sum(rec["wall_seconds"] for rec in records)
        print(f"# compressed {', '.join(r.name for r in group)} in {hms(seconds)}", flush=True)
        done += zip(group, records, strict=True)
    runs, records = [run for run, _ in done], [rec for _, rec in done]
    seconds = bench_step(runs, records, cfg)
    benched = sum("bench" in rec for rec in records) or 1
    for rec in records:
        rec["wall_seconds"] = round(rec["wall_seconds"] + seconds / benched * ("bench" in rec), 1)
        rec["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return done


def failed(record: dict, err: Exception) -> None:
    record["error"] = f"{type(err).__name__}: {err}"
    record["stderr_tail"] = getattr(err, "stderr_tail", "")
    record["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def structured_for(run: Run, cfg: Settings, planned: set[str]) -> Path | None:
    """The structured twin's folder for a PGB variant, if it exists or is ``planned``."""
    if run.method != "pgb":
        return None
    twin = run.structured_twin().name
    folder = cfg.runs / twin
    return folder if twin in planned or (folder / "report.json").is_file() else None


# ---------------------------------------------------------------- driver


def should_skip(path: Path, force: bool, retry_failed: bool) -> bool:
    """Skip a run whose result exists, unless forced (or it failed and retries are asked)."""
    if force or not path.is_file():
        return False
    if not retry_failed:
        return True
    try:
        return "error" not in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def eta_seconds(todo: list[Run], done: dict[bool, list[float]]) -> float | None:
    """Remaining time: per re-finetuning mode, the mean duration so far times the runs left."""
    every = [s for times in done.values() for s in times]
    if not every:
        return None
    mean = {k: sum(v) / len(v) for k, v in done.items() if v}
    overall = sum(every) / len(every)
    return sum(mean.get(r.refinetune, overall) for r in todo)


def recorded_seconds(results: Path) -> dict[tuple, list[float]]:
    """Wall seconds of the successful runs on record in ``results``, keyed by (task, variant,
    re-finetuned). A re-finetuned run also stands for its one-shot twin, less its
    re-finetune stage, under (task, variant, "derived")."""
    seconds: dict[tuple, list[float]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or "error" in rec or "wall_seconds" not in rec:
            continue
        task, variant, rft = rec.get("task"), rec.get("variant"), bool(rec.get("refinetune"))
        seconds.setdefault((task, variant, rft), []).append(float(rec["wall_seconds"]))
        stages = (rec.get("report") or {}).get("stage_seconds") or {}
        if rft and "refinetune" in stages:
            seconds.setdefault((task, variant, "derived"), []).append(
                float(rec["wall_seconds"]) - float(stages["refinetune"]))
    return seconds


def projected_seconds(run: Run, seconds: dict[tuple, list[float]]) -> float | None:
    """The median recorded duration of runs like ``run``: same task, method and
    re-finetuning; for a one-shot run without such a record, its re-finetuned twins less
    their re-finetune stage. None when the task and method have no record."""
    keys = [(run.task, run.variant, run.refinetune)]
    if not run.refinetune:
        keys.append((run.task, run.variant, "derived"))
    for key in keys:
        if seconds.get(key):
            return statistics.median(seconds[key])
    return None


def teacher_seconds(task: str) -> float | None:
    """Training seconds of the task's teacher as recorded by benchmarks/teachers.sh."""
    try:
        rec = json.loads((ROOT / "benchmarks" / "results" / "teachers" / f"{task}.json")
                         .read_text())
        return float(rec["train"]["seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def projection(runs: list[Run], cfg: Settings) -> str:
    """One line: the projected wall time of ``runs`` from the records in ``cfg.results``
    (and of the teachers ``benchmarks/teachers.sh`` would have to train first)."""
    seconds = recorded_seconds(cfg.results)
    known = [t for t in (projected_seconds(r, seconds) for r in runs) if t is not None]
    missing = len(runs) - len(known)
    teachers = {r.task for r in runs
                if builds_teachers(cfg) and not (cfg.teachers / r.task).is_dir()}
    train = [t for t in map(teacher_seconds, sorted(teachers)) if t is not None]
    if not known and not train:
        return f"# projected: unknown (no runs on record like these in {show(cfg.results)})"
    line = (f"# projected: {hms(sum(known) + sum(train))} for {len(known)} runs "
            f"(median recorded seconds per task, method and re-finetuning, from "
            f"{show(cfg.results)})")
    if train:
        line += f", {hms(sum(train))} of it for {len(train)} teacher{'s' * (len(train) > 1)}"
    if missing:
        line += f"; {missing} runs have no record like them and are not counted"
    return line


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def dry_run(runs: list[Run], cfg: Settings, planned: set[str], limit: int | None,
            sweep: bool = True) -> None:
    """Print what would run, teachers included; nothing is executed."""
    shown: set[str] = set()
    for block in blocks(runs[:limit], sweep):
        teacher = cfg.teachers / block[0][0].task
        if not teacher.is_dir() and block[0][0].task not in shown:
            shown.add(block[0][0].task)
            try:
                print(shlex.join(teacher_cmd(block[0][0].task, cfg)))
            except FileNotFoundError as err:
                print(f"# {err}")
        for group in block:
            if len(group) > 1:
                print(f"# sweep: {', '.join(r.name for r in group)}")
                print(shlex.join(group_cmd(group, teacher, cfg, force=False)))
            for run in group:
                print(f"# {run.name}")
                if len(group) == 1:
                    print(shlex.join(compress_cmd(run, teacher, cfg.runs / run.name, cfg)))
        runs_here = [run for group in block for run in group]
        print(f"# bench: {', '.join(r.name for r in runs_here)}")
        print(shlex.join(bench_cmd(bench_folders(runs_here, cfg, planned), teacher, cfg)))
    print(projection(runs[:limit], cfg))


def campaign(runs: list[Run], cfg: Settings, force: bool, limit: int | None,
             sweep: bool = True) -> int:
    """Execute ``runs`` (as sparsity sweeps unless ``sweep`` is False); returns the number
    of failed runs."""
    done: dict[bool, list[float]] = {True: [], False: []}
    teacher_errors: dict[str, str | None] = {}
    runs = runs[:limit]
    failures, count = 0, 0
    for block in blocks(runs, sweep):
        for run, record in execute(block, cfg, force, teacher_errors):
            write_json(cfg.results / f"{run.name}.json", record)
            done[run.refinetune].append(record["wall_seconds"])
            failures += "error" in record
            count += 1
            status = f"FAILED ({record['error'][:80]})" if "error" in record else "ok"
            left = runs[count:]
            print(f"[{count}/{len(runs)}] {run.name}: {status} in "
                  f"{hms(record['wall_seconds'])} | ETA {hms(eta_seconds(left, done))}",
                  flush=True)
    return failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,mrpc,stsb,cola")
    p.add_argument("--sparsities", default="0.5,0.75,0.875")
    p.add_argument("--methods", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--refinetune", choices=("both", "yes", "no"), default="both")
    p.add_argument("--model", help="base checkpoint of the teachers (recorded; default: the "
                   "packaged MiniLM-L6 that benchmarks/teachers.sh fine-tunes)")
    p.add_argument("--tag", help="run-name prefix (default: minilm, or --model's folder name)")
    p.add_argument("--teachers", default=str(DEFAULT_TEACHERS), help="<teachers>/<task>")
    p.add_argument("--runs", default=str(ROOT / "runs" / "campaign"), help="model folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "campaign"))
    p.add_argument("--data-dir", default=os.environ.get("PGB_DATA_DIR")
                   or str(ROOT.parent / "shared" / "data"), help="default: $PGB_DATA_DIR")
    p.add_argument("--bench-batch", type=int, default=32)
    p.add_argument("--bench-seq", type=int, default=128)
    p.add_argument("--bench-threads", type=int, default=2)
    p.add_argument("--seed", type=int, help="passed to pgb compress (default: its own)")
    p.add_argument("--compress-args", default="", help="extra flags for every pgb compress, "
                   "e.g. '--calib-samples 64 --refinetune-steps 10' for a smoke run")
    p.add_argument("--bench-args", default="", help="extra flags for every pgb bench")
    p.add_argument("--teacher-cache", help="folder where re-finetuning runs share the "
                   "teacher's outputs (identical results, no teacher forward pass after the "
                   "first run of a task; default: <runs>/teacher-cache)")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher forward in every re-finetune")
    p.add_argument("--no-sweep", action="store_true", help="one compress command per run "
                   "(default: one sparsity sweep per task, method and re-finetuning, which "
                   "computes importance and grouping once and writes the same models)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--limit", type=int, help="stop after N runs (skipped ones not counted)")
    p.add_argument("--force", action="store_true", help="re-run runs that have results")
    p.add_argument("--retry-failed", action="store_true", help="re-run failed runs")
    return p.parse_args(argv)


def split(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def settings(args: argparse.Namespace) -> Settings:
    return Settings(
        teachers=Path(args.teachers).resolve(), runs=Path(args.runs).resolve(),
        results=Path(args.results).resolve(), data_dir=Path(args.data_dir).resolve(),
        model=args.model, batch=args.bench_batch, seq=args.bench_seq,
        threads=args.bench_threads, seed=args.seed,
        compress_args=tuple(shlex.split(args.compress_args)),
        bench_args=tuple(shlex.split(args.bench_args)),
        teacher_cache=None if args.no_teacher_cache else
        Path(args.teacher_cache or Path(args.runs) / "teacher-cache").resolve())


def grid(args: argparse.Namespace) -> list[Run]:
    """The planned runs; unknown tasks, variants or sparsities are errors that name the fix."""
    tasks = [get_task(t).name for t in split(args.tasks)]
    variants = split(args.methods)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method {unknown}; choose from {', '.join(VARIANTS)}")
    sparsities = split(args.sparsities, float)
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"sparsity must be in [0, 1), got {bad}")
    refinetune = {"both": [False, True], "yes": [True], "no": [False]}[args.refinetune]
    tag = args.tag or (Path(args.model).name.lower() if args.model else "minilm")
    return plan(tag, tasks, sparsities, variants, refinetune)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = grid(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = settings(args)
    todo = [r for r in runs if not should_skip(cfg.results / f"{r.name}.json", args.force,
                                               args.retry_failed)]
    print(f"# {len(runs)} runs in the grid, {len(runs) - len(todo)} with results already "
          f"(skipped), {len(todo[:args.limit])} to run", flush=True)
    if args.dry_run:
        dry_run(todo, cfg, {r.name for r in runs}, args.limit, sweep=not args.no_sweep)
        return 0
    failures = campaign(todo, cfg, args.force, args.limit, sweep=not args.no_sweep)
    print(f"# done: {failures} failed; results in {show(cfg.results)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
