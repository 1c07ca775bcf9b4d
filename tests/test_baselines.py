"""Baselines: global magnitude pruning (exact, masks held) and the structured end to end."""

import copy

import pytest
import torch
import transformers
from tiny import tiny_batch, tiny_model

import pgb
from pgb.arch import MATRICES, dims_of, get_matrix
from pgb.baselines import compress_baseline, magnitude_masks, masks_held
from pgb.config import CompressConfig
from pgb.structured import save_structured
from pgb.tasks import get_task
from pgb.teacher_cache import TeacherOutputs

REPORT_KEYS = {"method", "target_sparsity", "achieved_sparsity", "params_before",
               "params_after", "flops_ratio", "stage_seconds", "matrices", "groups",
               "dropped_sublayers", "refinetune", "config", "pgb_version", "task",
               "compensation"}
TOTAL = 2 * (4 * 24 * 24 + 2 * 24 * 60)  # encoder linear weights of the tiny models


class FakeData:
    """The slice of ``TaskData`` the baselines use: fixed tiny batches, no files."""

    data_dir, files = None, None

    def __init__(self, n=3):
        self.batches = [tiny_batch(n=6, length=13, seed=s) for s in range(n)]

    def calibration(self, samples, batch_size, seed, by_length=False):
        return self.batches[:max(1, samples // 6)]

    def epoch_batches(self, batch_size, seed):
        return lambda epoch: [dict(b) for b in self.batches]

    def teacher_outputs(self, teacher, folder=None):
        return TeacherOutputs(teacher, folder)


def config(method, **kw):
    base = dict(sparsity=0.5, method=method, calib_samples=12, calib_batch_size=6,
                refinetune_steps=3, refinetune_lr=1e-2, batch_size=6, checkpoint_every=0)
    return CompressConfig(**{**base, **kw})


def run(method, model=None, **kw):
    teacher = model if model is not None else tiny_model("bert")
    return compress_baseline(teacher, None, get_task("mnli"), config(method, **kw), FakeData(),
                             evaluate_models=False, progress=False)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def encoder_weights(model):
    return {f"{i}.{r}": get_matrix(model, i, r).weight.detach().clone()
            for i in range(dims_of(model).layers) for r in MATRICES}


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9])
def test_magnitude_sparsity_is_exact(sparsity):
    masks = magnitude_masks(tiny_model("bert"), sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * TOTAL)


def test_magnitude_threshold_is_global_known_answer():
    model = tiny_model("bert")
    with torch.no_grad():
        for i in range(2):
            for r in MATRICES:
                get_matrix(model, i, r).weight.fill_(5.0)
        get_matrix(model, 0, "query").weight[0, 0] = 0.5
        get_matrix(model, 0, "value").weight[2, 1] = 0.3
        get_matrix(model, 1, "key").weight[1, 1] = -0.7
        get_matrix(model, 1, "ffn_out").weight[3, 5] = -0.1
        get_matrix(model, 1, "ffn_in").weight[0, 0] = -0.9  # fifth smallest: survives
    masks = magnitude_masks(model, 4 / TOTAL)
    pruned = {(n, tuple(i.tolist())) for n, m in masks.items() for i in torch.nonzero(~m)}
    assert pruned == {("0.query", (0, 0)), ("0.value", (2, 1)), ("1.key", (1, 1)),
                      ("1.ffn_out", (3, 5))}


def test_magnitude_ties_are_broken_by_position():
    model = tiny_model("bert")
    with torch.no_grad():
        for i in range(2):
            for r in MATRICES:
                get_matrix(model, i, r).weight.fill_(1.0)
    masks = magnitude_masks(model, 3 / TOTAL)  # all equal: the first three weights go
    assert torch.nonzero(~masks["0.query"]).tolist() == [[0, 0], [0, 1], [0, 2]]
    assert all(m.all() for n, m in masks.items() if n != "0.query")


def test_masks_held_during_training_then_plain():
    model = tiny_model("bert")
    masks = magnitude_masks(model, 0.5)
    with masks_held(model, masks):
        w = get_matrix(model, 0, "query").weight
        assert torch.all(w[~masks["0.query"]] == 0)
    assert type(get_matrix(model, 0, "query")) is torch.nn.Linear
    assert set(model.state_dict()) == set(tiny_model("bert").state_dict())


def test_magnitude_end_to_end_masks_survive_refinetuning():
    teacher = tiny_model("bert")
    before = copy.deepcopy(teacher.state_dict())
    result = run("magnitude", teacher, sparsity=0.6)
    report, student = result.report, result.model
    assert REPORT_KEYS <= set(report) and report["compensation"] == "n/a"
    assert report["achieved_sparsity"] == round(0.6 * TOTAL) / TOTAL
    assert report["refinetune"]["steps"] == 3
    assert report["flops_ratio"] == 1.0 and report["params_after"] == report["params_before"]
    masks = magnitude_masks(teacher, 0.6)
    trained, original = encoder_weights(student), encoder_weights(teacher)
    for name, keep in masks.items():
        assert torch.all(trained[name][~keep] == 0)  # zeros stay zeros
    assert not torch.allclose(trained["0.query"][masks["0.query"]],
                              original["0.query"][masks["0.query"]])  # the rest trained
    for k, v in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, before[k])


def test_magnitude_result_loads_with_plain_transformers(tmp_path):
    student = run("magnitude", sparsity=0.5).model
    student.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tiny_batch()
    assert torch.allclose(logits(loaded, batch), logits(student, batch), atol=1e-6)
    zeros = sum(int((w == 0).sum()) for w in encoder_weights(loaded).values())
    assert zeros >= round(0.5 * TOTAL)
    assert loaded.config.pgb_task == "mnli"


# ---------------------------------------------------------------- structured


@pytest.mark.parametrize("compensate,embedding_dtype", [(True, "float32"), (False, "float16")])
def test_structured_end_to_end(compensate, embedding_dtype, tmp_path):
    teacher = tiny_model("bert")
    before = copy.deepcopy(teacher.state_dict())
    result = run("structured", teacher, sparsity=0.5, compensate=compensate,
                 embedding_dtype=embedding_dtype)
    table = result.model.get_input_embeddings().weight
    assert torch.equal(table, table.to(getattr(torch, embedding_dtype)).float())
    report = result.report
    assert REPORT_KEYS <= set(report)
    assert set(report["stage_seconds"]) == {"importance", "grouping", "compensation",
                                            "refinetune"}
    assert report["compensation"] == ("least-squares rescaling" if compensate else "off")
    assert 0.5 <= report["achieved_sparsity"] < 0.505
    assert report["params_after"] < report["params_before"] and report["flops_ratio"] < 1
    assert len(report["matrices"]) == 12
    assert all(0 <= m["retained_importance"] <= 1 and m["groups"] == 1
               for m in report["matrices"])
    assert report["refinetune"]["steps"] == 3
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    save_structured(result.model, None, tmp_path)  # what `pgb compress` writes
    batch = tiny_batch()
    assert torch.equal(logits(pgb.load(tmp_path), batch), logits(result.model, batch))


def test_structured_without_refinetuning_keeps_the_rescaled_model():
    result = run("structured", refinetune=False)
    assert result.report["refinetune"] == {"steps": 0}
    assert hasattr(result.model, "pgb_structure")


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="use pgb.pipeline.compress"):
        run("pgb")
