"""Command line: one parser and one handler per command; ``main(argv) -> int``.

Commands print their result as one JSON object on the last line of stdout; progress and
logs go to stderr (and to ``OUT/log.txt`` for commands that write a folder).

Under ``torchrun --nproc_per_node N -m pgb ...`` every rank runs the command (see
``pgb.distributed``); ranks other than 0 show warnings only and print no result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from . import distributed as dist
from .config import EMBEDDING_DTYPES, CompressConfig, TrainConfig

log = logging.getLogger("pgb")


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, "
                   "wnli, squad, squad_v2, or custom (with --train-file ...)")
    p.add_argument("--data-dir", help="local data folder (default: $PGB_DATA_DIR, else the hub)")
    p.add_argument("--train-file", help="custom task: training file (csv, tsv, jsonl, parquet)")
    p.add_argument("--validation-file", help="custom task: validation file")
    p.add_argument("--text-columns", help="custom task: one or two comma-separated columns")
    p.add_argument("--label-column", default="label", help="custom task: label column")
    p.add_argument("--regression", action="store_true", help="custom task: numeric labels")


def _field_help(config_cls: type, name: str) -> str:
    """An option's help from its config field's own help text (one source), with the default."""
    field = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    default = "" if field.default is None else " (default: %(default)s)"
    return field.metadata["help"] + default


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _budgets(text: str) -> list[float]:
    """``0.5`` or a sweep ``0.5,0.75,0.875`` (range checked by CompressConfig)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers such as 0.5,0.875, got {text!r}"
        ) from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value appears twice in {text!r}")
    return values


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-eval-samples", type=_positive_int,
                   help="score dev metrics on a seeded subset of this many examples (for "
                        "large dev sets: SQuAD has 10,570 questions)")


def _out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=float, default=3.0, help=_field_help(TrainConfig, "epochs"))
    p.add_argument("--max-steps", type=int, help=_field_help(TrainConfig, "max_steps"))
    p.add_argument("--max-train-samples", type=int, help="train on a seeded subset")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example, longer ones truncated (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help=_field_help(TrainConfig, "batch_size"))
    p.add_argument("--lr", type=float, default=5e-5, help=_field_help(TrainConfig, "lr"))
    p.add_argument("--seed", type=int, default=42, help=_field_help(TrainConfig, "seed"))


def _compress_args(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--sparsity", type=_budgets,
                        help="fraction of encoder linear weights to remove, in [0, 1); "
                             "several comma-separated values (0.5,0.75,0.875) make a sweep: "
                             "importance and grouping search run once, OUT gets one folder "
                             "per value")
    budget.add_argument("--flops-ratio", type=_budgets,
                        help="budget in encoder FLOPs at sequence length 128, relative to "
                             "the teacher, in (0, 1]: the smallest sparsity that meets it "
                             "(pgb, structured); comma-separated values make a sweep")
    budget.add_argument("--speedup", type=_budgets,
                        help="budget as a speed-up over the teacher, > 1, measured on this "
                             "machine at --speedup-batch-size x --speedup-seq-len: the "
                             "smallest sparsity whose model runs that fast (pgb, structured); "
                             "comma-separated values make a sweep")
    p.add_argument("--speedup-batch-size", type=_positive_int, default=32,
                   help="batch size the --speedup budget is measured at")
    p.add_argument("--speedup-seq-len", type=_positive_int, default=128,
                   help="sequence length the --speedup budget is measured at")
    p.add_argument("--method", default="pgb", help="pgb, magnitude or structured")
    p.add_argument("--calib-samples", type=int, default=1024,
                   help=_field_help(CompressConfig, "calib_samples"))
    p.add_argument("--importance", default="fisher", help="fisher, magnitude or activation")
    p.add_argument("--no-permutation", action="store_true", help="ablation: contiguous blocks")
    p.add_argument("--uniform-groups", action="store_true", help="ablation: one G everywhere")
    p.add_argument("--shared-order", action="store_true",
                   help="one hidden-size permutation per sublayer: fewer run-time gathers, "
                        "less grouping freedom")
    p.add_argument("--no-drop", action="store_true", help="never drop a whole sublayer")
    p.add_argument("--embedding-dtype", default="float32",
                   choices=EMBEDDING_DTYPES,
                   help="round and store the token-embedding table in this precision "
                        "(float16: MiniLM-L6 checkpoint 0.33x instead of 0.59x at S = 0.875; "
                        "computation stays float32)")
    p.add_argument("--no-compensation", action="store_true",
                   help="ablation: no least-squares weight compensation")
    p.add_argument("--no-refinetune", action="store_true",
                   help="one shot: stop after compensation")
    p.add_argument("--no-distill", action="store_true", help="re-finetune on the task loss only")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--refinetune-epochs", type=float, default=1.0,
                       help=_field_help(CompressConfig, "refinetune_epochs"))
    group.add_argument("--refinetune-steps", type=int,
                       help=_field_help(CompressConfig, "refinetune_steps"))
    p.add_argument("--refinetune-lr", type=float, default=1e-4,
                   help=_field_help(CompressConfig, "refinetune_lr"))
    p.add_argument("--refinetune-batch-size", type=int, default=32,
                   help=_field_help(CompressConfig, "batch_size"))
    p.add_argument("--max-train-samples", type=int, help="re-finetune on a seeded subset")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help=_field_help(CompressConfig, "teacher_cache"))
    p.add_argument("--max-groups", type=int, default=16,
                   help=_field_help(CompressConfig, "max_groups"))
    p.add_argument("--seed", type=int, default=0, help=_field_help(CompressConfig, "seed"))
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted re-finetune from OUT's checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="re-finetuning steps between resumable checkpoints (0: never)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgb", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pgb {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune a task teacher")
    p.add_argument("--model", help="checkpoint folder or hub id (default: packaged MiniLM-L6)")
    _task_args(p)
    _eval_args(p)
    _out_args(p)
    _train_args(p)
    p = sub.add_parser("evaluate", help="dev metrics of a model (JSON on the last line)")
    p.add_argument("--model", help="model folder (teacher or pgb output)")
    _task_args(p)
    p.add_argument("--split", help="split to score (default: the task's dev split(s))")
    p.add_argument("--max-samples", type=int,
                   help="score a seeded subset of this many examples")
    p.add_argument("--batch-size", type=int, default=64,
                   help="examples per forward (default: %(default)s)")
    p = sub.add_parser("compress", help="compress a fine-tuned teacher")
    p.add_argument("--model", required=True, help="the fine-tuned teacher folder")
    _task_args(p)
    _eval_args(p)
    _out_args(p)
    _compress_args(p)
    p = sub.add_parser("run", help="fine-tune (if needed), compress, evaluate, summarise")
    p.add_argument("--model", help="base or fine-tuned model (default: packaged MiniLM-L6)")
    _task_args(p)
    _eval_args(p)
    _out_args(p)
    _compress_args(p)
    p.add_argument("--teacher-epochs", type=float, default=3.0,
                   help="epochs of teacher fine-tuning when --model is not yet tuned for "
                        "the task (default: %(default)s)")
    p.add_argument("--teacher-max-train-samples", type=int,
                   help="fine-tune the teacher on a seeded subset of this many examples")
    sub.add_parser("env", help="versions for bug reports")
    from .cli_tools import add_tool_parsers

    add_tool_parsers(sub)
    return parser


def setup_logging(quiet: bool = False) -> None:
    """Configure pgb's logger once, at the entry point (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    # progress milestones go to log.txt only: on a terminal the progress bars show them
    handler.addFilter(lambda record: not record.name.startswith("pgb.progress"))
    root = logging.getLogger("pgb")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)  # the log file always gets INFO; --quiet only hushes stderr


@contextlib.contextmanager
def mirror_log(folder: Path):
    """Also write pgb's log to ``folder/log.txt`` while the block runs."""
    handler = logging.FileHandler(folder / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pgb").addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger("pgb").removeHandler(handler)
        handler.close()


def emit(result: dict) -> None:
    """Print the command's result as one JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))


def hint_gpu(command: str) -> None:
    """A single process trains and compresses on the CPU: say so where a GPU sits idle."""
    import torch

    if torch.cuda.is_available():
        logging.getLogger("pgb").warning(
            "a CUDA device is available, but a single-process 'pgb %s' runs on the CPU; to "
            "use the GPU, run it as: torchrun --standalone --nproc_per_node 1 -m pgb %s ...",
            command, command)


# commands that pass over whole datasets: they keep freed memory for reuse (reuse_memory)
HEAVY = ("finetune", "compress", "run")


def reuse_memory() -> None:
    """Keep freed memory in this process (:func:`pgb.bench.keep_freed_memory`) for the
    heavy commands: their passes allocate large activations over and over, and fresh memory
    costs page faults on first touch (measured in docs/DESIGN.md). The process keeps its
    peak memory until it exits; ``PGB_REUSE_MEMORY=0`` leaves malloc as it is."""
    if os.environ.get("PGB_REUSE_MEMORY", "1") != "0":
        from .bench import keep_freed_memory

        keep_freed_memory()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined = dist.init_from_env()  # under torchrun: join the process group
    main_rank = dist.is_main()
    # one voice: ranks other than 0 log warnings only, show no progress, print no result
    args.quiet = args.quiet or not main_rank
    setup_logging(args.quiet)
    if not main_rank:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command in HEAVY:
        if not joined:
            hint_gpu(args.command)
        reuse_memory()
    from . import commands, tools

    name = f"cmd_{args.command}"
    handler = getattr(commands, name, None) or getattr(tools, name)
    try:
        result = handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"pgb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pgb {args.command}: interrupted; no partial output was left (an interrupted "
              "re-finetune continues with the same command plus --resume)", file=sys.stderr)
        return 130
    finally:
        if joined:
            dist.cleanup()
    if result is not None and main_rank:
        emit(result)
    return 0
