"""Saving and loading the compact checkpoint format.

A compact pgb folder holds ``config.json`` (the transformers config, with ``pgb_task``),
``recipe.json`` (kept blocks and permutations), ``model.safetensors`` (only kept blocks,
index maps and the dense non-encoder tensors), ``pgb.json`` (format and version) and the
tokenizer. ``load`` rebuilds the model from these alone: no teacher, no re-pruning.

The token-embedding table stays dense and, in float32, is half of a MiniLM-L6 checkpoint
(30,522 x 384 of 22.7 M parameters). ``round_embeddings(model, "float16")`` rounds it to
float16 values and marks the config (``pgb_embedding_dtype``), so the folder stores it in
two bytes per value; loading casts it back to float32, computation stays float32, and the
loaded model equals the saved one exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from . import __version__
from .arch import dims_of
from .config import EMBEDDING_DTYPES
from .modeling import check_not_sweep
from .recipe import Recipe
from .surgery import to_compact

log = logging.getLogger(__name__)
FORMAT = "pgb-compact"
WEIGHTS = "model.safetensors"


def round_embeddings(model: nn.Module, dtype: str) -> None:
    """Round the token-embedding table to ``dtype`` values (in place, kept in float32) and
    record ``dtype`` in the config, so the checkpoint stores the table in that precision."""
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {EMBEDDING_DTYPES}")
    if dtype == "float32":
        return
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight.copy_(weight.to(getattr(torch, dtype)).to(weight.dtype))
    model.config.pgb_embedding_dtype = dtype


def weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as written to model.safetensors: on the CPU, untied, with the
    token-embedding table in the config's ``pgb_embedding_dtype`` (float32 by default)."""
    state = model.state_dict(keep_vars=True)
    dtype = getattr(model.config, "pgb_embedding_dtype", "float32")
    embedding = model.get_input_embeddings().weight
    out = {}
    for name, value in state.items():
        value = value.detach().contiguous().cpu()
        if dtype != "float32" and state[name] is embedding:
            value = value.to(getattr(torch, dtype))
        out[name] = value
    return _unshare(out)


def save_compact(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Write a compact model (as built by ``to_compact``) into an existing folder."""
    folder = Path(folder)
    recipe: Recipe = model.pgb_recipe
    model.config.architectures = [type(model).__name__]  # what load() instantiates
    model.config.save_pretrained(folder)
    recipe.save(folder / "recipe.json")
    save_file(weights_state(model), str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / "pgb.json").write_text(json.dumps({"format": FORMAT, "pgb_version": __version__,
                                                 "torch": torch.__version__,
                                                 "transformers": transformers.__version__}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load(folder: str | Path) -> nn.Module:
    """Rebuild a compact pgb model from its folder (no teacher, no re-pruning)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no pgb model folder at {folder}")
    check_not_sweep(folder)
    if (folder / "structure.json").is_file():  # the structured baseline (heads/neurons)
        from .structured import load_structured

        return load_structured(folder)
    for name in ("config.json", "recipe.json", WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a pgb checkpoint: {name} is missing "
                             "(expected the output folder of `pgb compress`)")
    config = AutoConfig.from_pretrained(folder)
    try:
        recipe = Recipe.load(folder / "recipe.json")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / 'recipe.json'} is invalid or does not match the model "
                         f"in {folder / 'config.json'}: {err}; re-run `pgb compress` to "
                         "produce the folder again") from err
    model = _skeleton(config, recipe, folder)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types on truncation
        raise ValueError(f"corrupted checkpoint {folder / WEIGHTS}: {err}; "
                         "re-run `pgb compress` to produce it again") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder / WEIGHTS} does not match its recipe: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _skeleton(config, recipe: Recipe, folder: Path) -> nn.Module:
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise ValueError(f"{folder}/config.json names architecture {arch!r}, unknown to "
                         f"transformers {transformers.__version__}")
    if config.model_type != recipe.model_type:
        raise ValueError(f"recipe is for {recipe.model_type!r} but the config is "
                         f"{config.model_type!r}: the folder mixes two models")
    model = cls(config)
    if dims_of(model) != recipe.dims:
        raise ValueError(f"recipe dims {recipe.dims} do not match the model {dims_of(model)}")
    return to_compact(model, recipe)
