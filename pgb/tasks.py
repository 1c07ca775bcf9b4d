"""The task table: every supported task with its columns, labels, metrics and hub location.

One frozen :class:`Task` per task; everything downstream (loading, featurisation, metrics)
reads these fields instead of switching on task names.

Example::

    >>> from pgb.tasks import get_task
    >>> t = get_task("MRPC")
    >>> t.text_columns, t.num_labels, t.main_metric
    (('sentence1', 'sentence2'), 2, 'accuracy')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("classification", "regression", "qa")
GLUE_HUB = "nyu-mll/glue"


@dataclass(frozen=True)
class Task:
    """A supervised text task.

    Attributes:
        name: short name, e.g. ``"sst2"``; ``"custom"`` for user files.
        kind: ``"classification"``, ``"regression"`` or ``"qa"`` (extractive, SQuAD style).
        text_columns: one or two text columns; for QA ``("question", "context")``.
        label_column: the label column; ``None`` for QA (answers live in ``answers``).
        num_labels: classes; 1 for regression; 2 for QA (start/end logits). A custom
            classification task may use 0, meaning "count the classes in the train split"
            (see :func:`pgb.data.with_data_labels`).
        metrics: metric keys that evaluation returns.
        main_metric: the headline metric, one of ``metrics``.
        eval_splits: splits evaluated by default (MNLI has two).
        hub_path, hub_name: ``datasets.load_dataset(hub_path, hub_name)``; ``None`` when the
            task is not on the hub.
        label_names: class names in label-id order, if known.
        squad_v2: QA task with unanswerable questions (official v2 no-answer convention).
    """

    name: str
    kind: str
    text_columns: tuple[str, ...]
    label_column: str | None
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...]
    hub_path: str | None
    hub_name: str | None
    label_names: tuple[str, ...] | None
    squad_v2: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: main_metric {self.main_metric!r} is not in {self.metrics}"
            )
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(
                f"task {self.name!r}: give one or two text columns, got {self.text_columns}"
            )
        if self.kind != "qa" and not self.label_column:
            raise ValueError(f"task {self.name!r}: a {self.kind} task needs a label column")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError(f"task {self.name!r}: regression needs num_labels=1")
        if self.label_names is not None and self.num_labels != len(self.label_names):
            raise ValueError(
                f"task {self.name!r}: num_labels={self.num_labels} but "
                f"{len(self.label_names)} label names {self.label_names}"
            )

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs (or question/context)."""
        return len(self.text_columns) == 2


def _glue(name: str, text_columns: tuple[str, ...], label_names: tuple[str, ...] | None,
          metrics: tuple[str, ...] = ("accuracy",), main_metric: str = "accuracy",
          eval_splits: tuple[str, ...] = ("validation",)) -> Task:
    regression = label_names is None
    return Task(
        name=name,
        kind="regression" if regression else "classification",
        text_columns=text_columns,
        label_column="label",
        num_labels=1 if regression else len(label_names),
        metrics=metrics,
        main_metric=main_metric,
        eval_splits=eval_splits,
        hub_path=GLUE_HUB,
        hub_name=name,
        label_names=label_names,
    )


def _squad(name: str, hub_path: str, v2: bool) -> Task:
    return Task(
        name=name,
        kind="qa",
        text_columns=("question", "context"),
        label_column=None,
        num_labels=2,
        metrics=("exact_match", "f1"),
        main_metric="f1",
        eval_splits=("validation",),
        hub_path=hub_path,
        hub_name=None,
        label_names=None,
        squad_v2=v2,
    )


# Label ids follow the Hugging Face `glue` dataset (e.g. rte/qnli 0=entailment).
# MRPC/QQP headline on accuracy, as in the post-training pruning literature; f1 is reported too.
_ENTAIL2 = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc"),
        _glue("sst2", ("sentence",), ("negative", "positive")),
        _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
              ("accuracy", "f1")),
        _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "spearman"),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
              ("accuracy", "f1")),
        _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              ("accuracy", "accuracy_mm"), "accuracy",
              ("validation_matched", "validation_mismatched")),
        _glue("qnli", ("question", "sentence"), _ENTAIL2),
        _glue("rte", ("sentence1", "sentence2"), _ENTAIL2),
        _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
        _squad("squad", "rajpurkar/squad", v2=False),
        _squad("squad_v2", "rajpurkar/squad_v2", v2=True),
    )
}

# Spellings people use for the same tasks (GLUE folder names, "sts-b", "squad1.1").
_ALIASES = {
    "sst-2": "sst2", "sts-b": "stsb", "squad1": "squad", "squad1.1": "squad",
    "squad_v1": "squad", "squad_v1.1": "squad", "squad2": "squad_v2", "squad2.0": "squad_v2",
    "squad_v2.0": "squad_v2",
}


def get_task(name: str) -> Task:
    """Look up a task by name (case-insensitive; GLUE folder spellings like ``SST-2`` work).

    Raises:
        ValueError: unknown name; the message lists the known names and the custom option.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)}. For your own data use "
            "a custom task (pgb.tasks.custom_task / --task custom with --text-columns and "
            "--label-column)"
        )
    return TASKS[key]


def custom_task(
    text_columns: Sequence[str],
    label_column: str,
    kind: str = "classification",
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
) -> Task:
    """Describe a classification or regression task on user files (name ``"custom"``).

    ``num_labels=None`` for classification means: use ``len(label_names)`` if given, else
    0 = "count the classes in the train split" (resolve with :func:`pgb.data.with_data_labels`).
    Classification reports accuracy and macro F1; regression Pearson and Spearman.

    Example::

        >>> custom_task(["text"], "y", num_labels=3).num_labels
        3
    """
    if kind not in ("classification", "regression"):
        raise ValueError(
            f"custom tasks are 'classification' or 'regression', got kind={kind!r}; for "
            "SQuAD-style QA files use task 'squad' or 'squad_v2' with files={...}"
        )
    names = tuple(str(n) for n in label_names) if label_names is not None else None
    if kind == "regression":
        if num_labels not in (None, 1) or names is not None:
            raise ValueError(
                f"a regression task has one output and no label names, got "
                f"num_labels={num_labels}, label_names={names}"
            )
        num_labels = 1
    elif num_labels is None:
        num_labels = len(names) if names is not None else 0
    elif num_labels < 2:
        raise ValueError(f"classification needs num_labels >= 2, got {num_labels}")
    regression = kind == "regression"
    return Task(
        name="custom",
        kind=kind,
        text_columns=tuple(text_columns),
        label_column=label_column,
        num_labels=num_labels,
        metrics=("pearson", "spearman") if regression else ("accuracy", "f1_macro"),
        main_metric="spearman" if regression else "accuracy",
        eval_splits=("validation",),
        hub_path=None,
        hub_name=None,
        label_names=names,
    )
