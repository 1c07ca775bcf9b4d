"""Compact checkpoints: save -> load identical, physically smaller, clear errors."""

import copy
import json

import pytest
import torch
from test_surgery import logits, make_recipe
from tiny import FAMILIES, tiny_batch, tiny_model

from pgb.checkpoint import load, save_compact
from pgb.outputs import atomic_folder, check_output
from pgb.surgery import to_compact


def saved(tmp_path, family="bert", sparsity=0.6, weak=("1.attn",), **cfg):
    model = tiny_model(family)
    recipe = make_recipe(model, sparsity, weak=weak, **cfg)
    compact = to_compact(copy.deepcopy(model), recipe)
    folder = tmp_path / f"{family}-compact"
    folder.mkdir()
    save_compact(compact, None, folder)
    return model, compact, folder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared_order", [False, True])
def test_save_load_gives_identical_logits(tmp_path, family, shared_order):
    _, compact, folder = saved(tmp_path, family, shared_order=shared_order)
    loaded = load(folder)
    batch = tiny_batch()
    assert torch.equal(logits(loaded, batch), logits(compact, batch))
    assert loaded.pgb_recipe.to_json() == compact.pgb_recipe.to_json()
    assert loaded.pgb_recipe.meta.get("shared_order", False) is shared_order


def test_checkpoint_is_physically_smaller(tmp_path):
    model, compact, folder = saved(tmp_path, sparsity=0.8, weak=())
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    small = (folder / "model.safetensors").stat().st_size
    big = (dense / "model.safetensors").stat().st_size
    enc = sum(p.numel() for n, p in model.named_parameters() if "encoder.layer" in n
              and n.endswith("weight") and "LayerNorm" not in n) * 4
    # 80% of the encoder linear bytes are gone; the int64 index maps (hidden-sized, six per
    # layer) cost a visible share only at these tiny sizes
    assert big - small > 0.6 * enc


def test_truncated_checkpoint_is_refused(tmp_path):
    _, _, folder = saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted checkpoint"):
        load(folder)


def test_missing_recipe_is_not_a_pgb_checkpoint(tmp_path):
    _, _, folder = saved(tmp_path)
    (folder / "recipe.json").unlink()
    with pytest.raises(ValueError, match="recipe.json is missing"):
        load(folder)


def test_recipe_for_another_model_is_refused(tmp_path):
    _, _, folder = saved(tmp_path)
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["dims"]["intermediate"] = 64
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="does not match the model|do not match"):
        load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pgb model folder"):
        load(tmp_path / "nope")


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output(out, overwrite=False)
    assert check_output(out, overwrite=True) == out.resolve()


def test_output_inside_the_input_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output(model_dir, overwrite=True, inputs=(str(model_dir),))


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_only_on_success(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old").write_text("keep me until the new one is complete")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
        raise KeyboardInterrupt
    assert (out / "old").exists()
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_shared_order_model_exports_to_onnx(tmp_path, family):
    from pgb.export import export_onnx, verify_onnx

    _, compact, _ = saved(tmp_path, family, shared_order=True)
    path = export_onnx(compact, tmp_path / "model.onnx")
    assert verify_onnx(compact, path) <= 1e-4


@pytest.mark.parametrize("family,dtype", [("bert", "float16"), ("distilbert", "bfloat16"),
                                          ("electra", "float16")])
def test_half_precision_embeddings_are_stored_small_and_reload_exactly(tmp_path, family, dtype):
    from safetensors import safe_open

    from pgb.checkpoint import round_embeddings

    model, compact, folder = saved(tmp_path, family)
    full = (folder / "model.safetensors").stat().st_size
    before = compact.get_input_embeddings().weight.detach().clone()
    round_embeddings(compact, dtype)
    after = compact.get_input_embeddings().weight
    assert after.dtype == torch.float32 and not torch.equal(after, before)
    assert torch.equal(after, after.to(getattr(torch, dtype)).float())  # representable
    half = tmp_path / "half"
    half.mkdir()
    save_compact(compact, None, half)
    name = next(n for n, p in compact.named_parameters() if p is after)
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert f.get_tensor(name).dtype == getattr(torch, dtype)
    saved_bytes = full - (half / "model.safetensors").stat().st_size
    assert saved_bytes == after.numel() * 2  # two of four bytes per value, nothing else
    loaded = load(half)
    assert loaded.get_input_embeddings().weight.dtype == torch.float32
    batch = tiny_batch()
    assert torch.equal(logits(loaded, batch), logits(compact, batch))
    assert not torch.equal(logits(loaded, batch), logits(model, batch))
    again = tmp_path / "again"  # a reloaded model keeps its storage precision
    again.mkdir()
    save_compact(loaded, None, again)
    size = (half / "model.safetensors").stat().st_size
    assert (again / "model.safetensors").stat().st_size == size


def test_unknown_embedding_dtype_is_refused():
    from pgb.checkpoint import round_embeddings
    from pgb.config import CompressConfig

    with pytest.raises(ValueError, match="'int8'"):
        round_embeddings(tiny_model("bert"), "int8")
    with pytest.raises(ValueError, match="'float8'"):
        CompressConfig(embedding_dtype="float8")
    with pytest.raises(ValueError, match="magnitude baseline"):
        CompressConfig(method="magnitude", embedding_dtype="float16")
