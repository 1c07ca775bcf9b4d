"""Structured baseline (Kwon et al. 2022): Fisher, selection, removal, rescaling, save/load."""

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_batch, tiny_model

import pgb
from pgb.arch import dims_of, get_matrix, layer_module
from pgb.structured import (
    Structure,
    head_columns,
    mask_fisher,
    mask_units,
    rescale,
    save_structured,
    select,
    shrink,
)
from pgb.surgery import ConstantOutput, DroppedAttention, EmptyOutput


def calib(n=3):
    return [tiny_batch(n=6, length=13, seed=s) for s in range(n)]


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def hidden(model, batches):
    """Last hidden states of every valid token of the batches."""
    with torch.no_grad():
        return torch.cat([model.base_model(input_ids=b["input_ids"],
                                           attention_mask=b["attention_mask"])
                          .last_hidden_state[b["attention_mask"].bool()] for b in batches])


def structure_at(model, sparsity, seed=0):
    """A selection from random Fisher values (planted structure is tested separately)."""
    d = dims_of(model)
    g = torch.Generator().manual_seed(seed)
    return select(torch.rand(d.layers, d.heads, generator=g) ** 3,
                  torch.rand(d.layers, d.intermediate, generator=g) ** 3, d, sparsity,
                  model.config.model_type)


def test_planted_dead_head_has_zero_fisher_and_goes_first():
    model = tiny_model("bert")
    d = dims_of(model)
    cols = head_columns((1,), d.head_size)
    with torch.no_grad():  # head 1 of layer 0 outputs nothing and is read by nothing
        get_matrix(model, 0, "value").weight[cols] = 0
        get_matrix(model, 0, "value").bias[cols] = 0
        get_matrix(model, 0, "attn_out").weight[:, cols] = 0
    heads, neurons = mask_fisher(model, calib(), progress=False)
    assert heads[0, 1] == 0
    assert (heads.flatten().sort().values[1:] > 0).all() and (neurons > 0).all()
    # a budget of exactly one head: losing the dead head costs nothing, any neurons cost more
    one_head = 4 * d.hidden * d.head_size / (d.layers * (4 * d.hidden ** 2
                                                         + 2 * d.hidden * d.intermediate))
    s = select(heads, neurons, d, one_head, "bert")
    assert s.heads == ((0, 2, 3), (0, 1, 2, 3))
    assert all(len(n) == d.intermediate for n in s.neurons)


def test_select_known_answer():
    d = dims_of(tiny_model("bert"))  # head costs 576 weights, neuron 48, total 10368
    heads = torch.tensor([[5.0, 1.0, 4.0, 3.0], [9.0, 8.0, 7.0, 6.0]])
    neurons = torch.full((2, d.intermediate), 100.0)
    neurons[1, :12] = 0.01  # 12 weak neurons: together as costly as one head
    s = select(heads, neurons, d, 576 / 10368, "bert")
    assert s.heads == ((0, 1, 2, 3), (0, 1, 2, 3))  # 12 weak neurons (0.12) < head 1 (1.0)
    assert s.neurons[1] == tuple(range(12, d.intermediate))
    s = select(heads, neurons, d, 2 * 576 / 10368, "bert")
    assert s.heads == ((0, 2, 3), (0, 1, 2, 3))  # then the weakest head, 1.0 < 12 x 100


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_budget_met(sparsity):
    model = tiny_model("bert")
    s = structure_at(model, sparsity)
    assert sparsity <= s.sparsity() < sparsity + 0.005
    assert s.sparsity() == pytest.approx(1 - s.kept_weights() / 10368)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_shrunk_equals_masked_dense(family, sparsity):
    model = tiny_model(family)
    s = structure_at(model, sparsity, seed=1)
    masked = copy.deepcopy(model)
    mask_units(masked, s)
    small = shrink(copy.deepcopy(model), s)
    batch = tiny_batch()
    assert torch.allclose(logits(small, batch), logits(masked, batch), atol=1e-5)
    d = dims_of(model)
    for i in range(d.layers):  # really smaller: only kept heads and neurons are stored
        if s.heads[i]:
            assert get_matrix(small, i, "query").out_features == len(s.heads[i]) * d.head_size
            assert get_matrix(small, i, "attn_out").in_features == len(s.heads[i]) * d.head_size
        if s.neurons[i]:
            assert get_matrix(small, i, "ffn_out").in_features == len(s.neurons[i])


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_layer_without_heads_or_neurons_still_runs(family):
    model = tiny_model(family)
    d = dims_of(model)
    s = Structure(family, d, heads=((), (1, 3)), neurons=(tuple(range(7)), ()))
    masked = copy.deepcopy(model)
    mask_units(masked, s)
    small = shrink(copy.deepcopy(model), s)
    core = layer_module(small, 0).get_submodule(pgb.arch.get_arch(small).attn_core)
    assert isinstance(core, DroppedAttention)
    assert isinstance(get_matrix(small, 1, "ffn_in"), EmptyOutput)
    assert isinstance(get_matrix(small, 1, "ffn_out"), ConstantOutput)
    assert s.dropped_sublayers() == ["0.attn", "1.ffn"]
    batch = tiny_batch()
    assert torch.allclose(logits(small, batch), logits(masked, batch), atol=1e-5)


def sublayer_error(student, teacher, batches, role):
    """Squared error of layer 0's ``role`` output (attn_out / ffn_out) plus its bias, vs teacher."""
    outs = []
    for model in (student, teacher):
        box: list = []
        h = get_matrix(model, 0, role).register_forward_hook(
            lambda _m, _a, y, box=box: box.append(y))
        hidden(model, batches)
        h.remove()
        outs.append(torch.cat([y[b["attention_mask"].bool()]
                               for y, b in zip(box, batches, strict=True)]))
    return (outs[0] - outs[1]).pow(2).mean()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_rescaling_reduces_reconstruction_error(family):
    teacher = tiny_model(family)
    batches = calib(4)
    heads, neurons = mask_fisher(teacher, batches, progress=False)
    s = select(heads, neurons, dims_of(teacher), 0.5, family)
    assert all(s.heads) and all(s.neurons)
    plain = shrink(copy.deepcopy(teacher), s)
    tuned = copy.deepcopy(plain)
    scales = rescale(tuned, teacher, batches, progress=False)
    assert set(scales) == {"0.attn", "0.ffn", "1.attn", "1.ffn"}
    # layer 0's attention branch is exactly what the first least squares minimises
    assert sublayer_error(tuned, teacher, batches, "attn_out") \
        < sublayer_error(plain, teacher, batches, "attn_out")
    target = hidden(teacher, batches)  # and the whole encoder gets closer to the teacher
    before = (hidden(plain, batches) - target).pow(2).mean()
    after = (hidden(tuned, batches) - target).pow(2).mean()
    assert after < 0.95 * before


def test_nothing_pruned_rescales_by_one():
    teacher = tiny_model("bert").double()
    s = structure_at(teacher, 0.0)
    student = shrink(copy.deepcopy(teacher), s)
    scales = rescale(student, teacher, calib(), damping=1e-9, progress=False)
    for v in scales.values():
        assert torch.allclose(v, torch.ones_like(v), atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_save_load_identical(family, tmp_path):
    model = shrink(tiny_model(family), structure_at(tiny_model(family), 0.6, seed=2))
    save_structured(model, None, tmp_path)
    loaded = pgb.load(tmp_path)
    assert loaded.pgb_structure == model.pgb_structure
    batch = tiny_batch()
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_save_load_identical_with_float16_embeddings(tmp_path):
    from pgb.checkpoint import round_embeddings

    model = shrink(tiny_model("bert"), structure_at(tiny_model("bert"), 0.6, seed=2))
    round_embeddings(model, "float16")
    save_structured(model, None, tmp_path)
    loaded = pgb.load(tmp_path)
    batch = tiny_batch()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert loaded.config.pgb_embedding_dtype == "float16"


def test_corrupt_structure_is_a_clear_error(tmp_path):
    model = shrink(tiny_model("bert"), structure_at(tiny_model("bert"), 0.5))
    save_structured(model, None, tmp_path)
    (tmp_path / "structure.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="structure version 99"):
        pgb.load(tmp_path)


def test_structure_mismatch_is_rejected():
    model = tiny_model("bert")
    d = dims_of(model)
    with pytest.raises(ValueError, match="must be sorted distinct"):
        Structure("bert", d, ((0, 9), (0,)), ((0,), (0,))).validate()
    with pytest.raises(ValueError, match="structure is for distilbert"):
        shrink(model, Structure("distilbert", d, ((0,), (0,)), ((0,), (0,))))
