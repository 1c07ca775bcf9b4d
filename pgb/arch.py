"""Architecture table: where the prunable matrices of each supported encoder family live.

Everything pgb knows about a model family is in ``ARCHS``, keyed by ``config.model_type``
and addressed by attribute paths (``get_submodule``), never by ``isinstance`` checks on
transformers classes. The coupling rules that make permutations free at run time follow
from the roles below:

- ``query``/``key``/``value`` rows and ``attn_out`` columns share the attention inner
  dimension (heads x head size); permuting heads, or dims inside a head, consistently
  across the four leaves the sublayer's function unchanged.
- ``ffn_in`` rows and ``ffn_out`` columns share the FFN intermediate dimension.
- ``query``/``key``/``value``/``ffn_in`` columns and ``attn_out``/``ffn_out`` rows touch the
  residual stream (hidden size), shared by every layer: those sides keep their own
  permutation and pay a gather or scatter at run time.

Example::

    >>> spec = get_arch(model)            # model.config.model_type == "bert"
    >>> spec.matrix_path(3, "query")
    'encoder.layer.3.attention.self.query'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTN_MATRICES = ("query", "key", "value", "attn_out")
FFN_MATRICES = ("ffn_in", "ffn_out")
MATRICES = ATTN_MATRICES + FFN_MATRICES
# Matrices whose rows (outputs) are the sublayer's inner dimension; the others read it.
INNER_IS_ROWS = {"query": True, "key": True, "value": True, "attn_out": False,
                 "ffn_in": True, "ffn_out": False}
SUBLAYERS = {"attn": ATTN_MATRICES, "ffn": FFN_MATRICES}


@dataclass(frozen=True)
class ArchSpec:
    """Where one encoder family keeps its layers and matrices (paths from ``model.base_model``)."""

    model_type: str
    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: str
    ffn_out: str
    ffn_act: str  # the FFN activation module, between ``ffn_in`` and ``ffn_out``
    attn_core: str  # replaced by a constant when the whole attention sublayer is dropped
    attn_out_in_core: bool  # True when ``attn_out`` lives inside ``attn_core``
    # the LayerNorm closing each sublayer (post-norm: LN(residual + branch)), in the layer
    attn_norm: str = "attention.output.LayerNorm"
    ffn_norm: str = "output.LayerNorm"
    # the LayerNorm of the embeddings; an ``embeddings_project`` linear, where the model
    # has one (ELECTRA with embedding_size != hidden_size), follows it
    embed_norm: str = "embeddings.LayerNorm"
    hidden_attr: str = "hidden_size"
    heads_attr: str = "num_attention_heads"
    intermediate_attr: str = "intermediate_size"
    layers_attr: str = "num_hidden_layers"
    # Attributes of ``attn_core`` that hold the head count / width (updated by head removal).
    core_head_attrs: tuple[str, ...] = ("num_attention_heads",)
    core_width_attrs: tuple[str, ...] = ("all_head_size",)
    # Per-head parameters outside the layer (MPNet's relative position bias) pin the head order.
    fixed_head_order: bool = False

    def matrix_path(self, layer: int, role: str) -> str:
        """Path of matrix ``role`` of layer ``layer``, relative to ``model.base_model``."""
        if role not in MATRICES:
            raise ValueError(f"unknown matrix role {role!r}; expected one of {MATRICES}")
        return f"{self.layers}.{layer}.{getattr(self, role)}"


def _bert_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type=model_type, layers="encoder.layer",
        query="attention.self.query", key="attention.self.key",
        value="attention.self.value", attn_out="attention.output.dense",
        ffn_in="intermediate.dense", ffn_out="output.dense",
        ffn_act="intermediate.intermediate_act_fn",
        attn_core="attention.self", attn_out_in_core=False,
    )


ARCHS: dict[str, ArchSpec] = {
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
    "xlm-roberta": _bert_like("xlm-roberta"),
    "electra": _bert_like("electra"),
    "distilbert": ArchSpec(
        model_type="distilbert", layers="transformer.layer",
        query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
        attn_out="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
        ffn_act="ffn.activation",
        attn_core="attention", attn_out_in_core=True,
        attn_norm="sa_layer_norm", ffn_norm="output_layer_norm",
        hidden_attr="dim", heads_attr="n_heads", intermediate_attr="hidden_dim",
        layers_attr="n_layers", core_head_attrs=("n_heads",), core_width_attrs=(),
    ),
    "mpnet": ArchSpec(
        model_type="mpnet", layers="encoder.layer",
        query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
        attn_out="attention.attn.o", ffn_in="intermediate.dense", ffn_out="output.dense",
        ffn_act="intermediate.intermediate_act_fn",
        attn_core="attention.attn", attn_out_in_core=True, fixed_head_order=True,
        attn_norm="attention.LayerNorm",
    ),
}


def get_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """The ``ArchSpec`` of a model (or a ``model_type`` string); clear error when unsupported."""
    model_type = model_or_type
    if not isinstance(model_or_type, str):
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; pgb supports model_type in "
            f"{sorted(ARCHS)} (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet encoders)"
        )
    return ARCHS[model_type]


@dataclass(frozen=True)
class Dims:
    """Sizes of an encoder: layers, hidden, heads, head size, intermediate."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


def dims_of(model: nn.Module) -> Dims:
    """Encoder sizes read from the model's config through the architecture table."""
    spec, config = get_arch(model), model.config
    return Dims(
        layers=getattr(config, spec.layers_attr), hidden=getattr(config, spec.hidden_attr),
        heads=getattr(config, spec.heads_attr),
        intermediate=getattr(config, spec.intermediate_attr),
    )


def encoder(model: nn.Module) -> nn.Module:
    """The base (encoder) model, whatever task head sits on top."""
    return model.base_model


def get_matrix(model: nn.Module, layer: int, role: str) -> nn.Module:
    """The module (``nn.Linear`` or a pgb replacement) at matrix ``role`` of ``layer``."""
    return encoder(model).get_submodule(get_arch(model).matrix_path(layer, role))


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` under ``root`` by ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """Encoder layer number ``layer``."""
    return encoder(model).get_submodule(f"{get_arch(model).layers}.{layer}")


def encoder_linear_params(dims: Dims) -> dict[str, int]:
    """Weight count of each matrix role in one layer (biases excluded)."""
    h, i = dims.hidden, dims.intermediate
    return {"query": h * h, "key": h * h, "value": h * h, "attn_out": h * h,
            "ffn_in": i * h, "ffn_out": h * i}
