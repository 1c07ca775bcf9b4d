"""The task table: columns, labels and metrics of every task; lookup and custom tasks."""

from __future__ import annotations

import dataclasses

import pytest

from pgb.tasks import TASKS, Task, custom_task, get_task

# Standard HF `glue` / `squad` column names, written out independently of the table.
EXPECTED_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "squad": ("question", "context"),
    "squad_v2": ("question", "context"),
}


def test_table_has_all_glue_and_squad_tasks():
    assert set(TASKS) == set(EXPECTED_COLUMNS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_columns_and_hub(name):
    task = get_task(name)
    assert task.name == name
    assert task.text_columns == EXPECTED_COLUMNS[name]
    assert task.main_metric in task.metrics
    if task.kind == "qa":
        assert (task.label_column, task.num_labels, task.hub_name) == (None, 2, None)
    else:
        assert (task.label_column, task.hub_path, task.hub_name) == ("label", "nyu-mll/glue", name)


def test_metrics_and_labels_per_task():
    assert get_task("cola").metrics == ("mcc", "accuracy")
    assert get_task("cola").main_metric == "mcc"
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("qqp").metrics == ("accuracy", "f1")
    stsb = get_task("stsb")
    assert (stsb.kind, stsb.num_labels, stsb.main_metric) == ("regression", 1, "spearman")
    mnli = get_task("mnli")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert mnli.metrics == ("accuracy", "accuracy_mm")
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")


def test_squad_versions():
    v1, v2 = get_task("squad"), get_task("squad_v2")
    assert (v1.squad_v2, v2.squad_v2) == (False, True)
    assert v1.metrics == v2.metrics == ("exact_match", "f1")
    assert (v1.hub_path, v2.hub_path) == ("rajpurkar/squad", "rajpurkar/squad_v2")


def test_lookup_is_case_insensitive_and_knows_glue_spellings():
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task(" MNLI ") is TASKS["mnli"]
    assert get_task("STS-B") is TASKS["stsb"]


def test_unknown_task_names_known_ones_and_custom_option():
    with pytest.raises(ValueError, match=r"unknown task 'imdb'.*sst2.*squad_v2.*custom"):
        get_task("imdb")


def test_tasks_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("sst2").num_labels = 3


def test_custom_classification():
    task = custom_task(["text"], "y", label_names=["a", "b", "c"])
    assert (task.name, task.kind, task.num_labels) == ("custom", "classification", 3)
    assert task.text_columns == ("text",)
    assert task.metrics == ("accuracy", "f1_macro")
    assert custom_task(["q", "d"], "y").num_labels == 0  # counted from the train split later
    assert custom_task(["q", "d"], "y", num_labels=4).is_pair


def test_custom_regression():
    task = custom_task(["a", "b"], "score", kind="regression")
    assert (task.num_labels, task.metrics, task.main_metric) == (1, ("pearson", "spearman"),
                                                                 "spearman")


def test_custom_task_errors():
    with pytest.raises(ValueError, match="kind='qa'.*squad"):
        custom_task(["q", "c"], "y", kind="qa")
    with pytest.raises(ValueError, match="num_labels >= 2, got 1"):
        custom_task(["t"], "y", num_labels=1)
    with pytest.raises(ValueError, match="num_labels=3 but 2 label names"):
        custom_task(["t"], "y", num_labels=3, label_names=["a", "b"])
    with pytest.raises(ValueError, match="one or two text columns"):
        custom_task(["a", "b", "c"], "y")


def test_task_validates_main_metric_and_kind():
    base = dict(name="x", kind="classification", text_columns=("t",), label_column="y",
                num_labels=2, metrics=("accuracy",), main_metric="accuracy",
                eval_splits=("validation",), hub_path=None, hub_name=None, label_names=None)
    with pytest.raises(ValueError, match="main_metric 'f1' is not in"):
        Task(**{**base, "main_metric": "f1"})
    with pytest.raises(ValueError, match="kind must be one of .* got 'ranking'"):
        Task(**{**base, "kind": "ranking"})
