"""Integration on the real all-MiniLM-L6-v2 and real SST-2 data: the full one-shot path
(Fisher importance, grouping, allocation, compensation, compact surgery), equivalence,
save/load, file size and ONNX."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from pgb.allocation import allocate
from pgb.arch import dims_of
from pgb.checkpoint import load, save_compact
from pgb.compensate import apply_masks, compensate
from pgb.config import CompressConfig
from pgb.export import export_onnx, verify_onnx
from pgb.importance import importance_scores
from pgb.modeling import load_task_model
from pgb.pipeline import search_groupings
from pgb.surgery import densify, to_compact
from pgb.taskdata import TaskData
from pgb.tasks import get_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(minilm_path, shared_data):
    torch.manual_seed(0)
    task = get_task("sst2")
    model, tok, _ = load_task_model(minilm_path, task)
    data = TaskData(task, tok, shared_data, max_samples=256, seed=0)
    calib = data.calibration(64, 32, seed=0)
    scores = importance_scores(model.eval(), calib, "fisher", progress=False)
    return model, tok, calib, scores


@pytest.fixture(scope="module", params=[0.5, 0.875])
def compressed(request, setup):
    model, tok, calib, scores = setup
    cfg = CompressConfig(sparsity=request.param)
    groupings = search_groupings(scores, model, cfg, progress=False)
    recipe = allocate(groupings, dims_of(model), "bert", cfg.sparsity)
    masked = copy.deepcopy(model)
    apply_masks(masked, recipe)
    compensate(masked, model, recipe, calib, progress=False)
    compact = to_compact(copy.deepcopy(masked), recipe)
    return request.param, recipe, masked, compact


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


def test_budget_met(compressed):
    sparsity, recipe, _, _ = compressed
    assert abs(recipe.sparsity() - sparsity) <= 0.005


def test_compact_equals_masked_dense_on_real_text(setup, compressed):
    _, _, calib, _ = setup
    _, _, masked, compact = compressed
    for batch in calib[:2]:
        ref = logits(masked, batch)
        assert (logits(compact, batch) - ref).abs().max() <= 1e-4
        assert (logits(densify(compact), batch) - ref).abs().max() <= 1e-4


def test_save_load_identical_and_small(setup, compressed, tmp_path):
    model, tok, calib, _ = setup
    sparsity, _, _, compact = compressed
    save_compact(compact, tok, tmp_path)
    loaded = load(tmp_path)
    assert torch.equal(logits(loaded, calib[0]), logits(compact, calib[0]))
    # encoder linear bytes (weights + index maps) are about (1 - S) of the dense ones
    stored = load_file(str(tmp_path / "model.safetensors"))
    enc = [k for k in stored if ".encoder.layer." in k and "LayerNorm" not in k
           and not k.endswith("bias")]
    compact_bytes = sum(stored[k].numel() * stored[k].element_size() for k in enc)
    dense_bytes = 4 * sum(p.numel() for n, p in model.named_parameters()
                          if ".encoder.layer." in n and n.endswith("weight")
                          and "LayerNorm" not in n)
    assert compact_bytes <= (1 - sparsity + 0.01) * dense_bytes
    # the whole file: embeddings (52% of MiniLM-L6) stay dense in float32
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    whole = (tmp_path / "model.safetensors").stat().st_size / \
        (dense / "model.safetensors").stat().st_size
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    floor = embeddings / sum(p.numel() for p in model.parameters())
    assert whole <= floor + (1 - floor) * (1 - sparsity) + 0.02


def test_onnx_matches(compressed, tmp_path):
    _, _, _, compact = compressed
    path = export_onnx(compact, tmp_path / "model.onnx")
    assert verify_onnx(compact, path) <= 1e-4
