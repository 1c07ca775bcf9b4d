"""Dropout for training on CPU with a counter-based mask from pgb's native library.

torch's CPU dropout draws its Bernoulli numbers one by one from a serial generator: in a
re-finetuning step of MiniLM-L6 (batch 32 x 96) ``aten::bernoulli_`` was about a fifth of
the step. Here the mask of one call is a hash of (seed, position) computed 8 values at a
time on every thread (``pgb_dropout`` in ``pgb/csrc/grouped_mm_avx2.c``), and the backward
pass recomputes it from the seed instead of storing it. Each call draws its seed from
torch's generator, so ``torch.manual_seed`` still fixes every mask; the masks are other
draws than torch's, the same in distribution (rate p, scale 1 / (1 - p)).

:func:`fast_dropout` switches a model to it for the length of a ``with`` block (training
loops): every ``nn.Dropout`` module, and the attention-probability dropout of models whose
attention goes through transformers' attention interface with ``sdpa`` (BERT, RoBERTa,
ELECTRA, XLM-R ...). With dropout on, torch's CPU ``scaled_dot_product_attention`` runs its
unfused math path anyway (scores, softmax, its own dropout, product); the replacement runs
the same steps with the native dropout. Outside training, or where the native library is
unavailable, on other devices and dtypes, everything is torch's own.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native

ATTENTION = "pgb_sdpa"  # the attention implementation registered with transformers


def usable(x: Tensor) -> bool:
    """Whether the native dropout can take ``x`` (float32, CPU, under 2^32 values)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() < 2 ** 32
            and native.available())


class _NativeDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return native.dropout_mask_apply(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return native.dropout_mask_apply(grad.contiguous(), ctx.p, ctx.seed), None, None


def apply_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the native mask where :func:`usable`."""
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0 or not usable(x):
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    return _NativeDropout.apply(x, p, seed)


def _module_forward(self: nn.Dropout, x: Tensor) -> Tensor:
    if self.inplace:
        return F.dropout(x, self.p, self.training, inplace=True)
    return apply_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
              attention_mask: Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs):
    """transformers' ``sdpa`` attention, except in training with dropout on a plain
    (non-causal, no grouped key/value heads, no position bias) attention whose tensors the
    native dropout takes: there the scores, softmax, native dropout and product, which is
    what SDPA's math path computes. Returns (output (B, T, H, D), None) as ``sdpa`` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (dropout > 0.0 and module.training and usable(query)
             and not kwargs.get("is_causal") and not getattr(module, "is_causal", False)
             and getattr(module, "num_key_value_groups", 1) == 1
             and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and (attention_mask is None or attention_mask.dim() == 4))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # scale the query (T x D per head) rather than the scores (T x T), and mask in place:
    # the product's backward needs its inputs only
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: attend
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores += attention_mask
    probs = apply_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def fast_dropout(model: nn.Module):
    """Within the block, ``model``'s dropout uses the native mask (see the module
    docstring); on exit the model is as it was. A no-op where the native library is
    unavailable or the model's parameters are not on the CPU."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or not native.available():
        yield model
        return
    patched = [m for m in model.modules() if type(m) is nn.Dropout and "forward" not in vars(m)]
    for m in patched:
        m.forward = types.MethodType(_module_forward, m)
    config = getattr(model, "config", None)
    switch = getattr(config, "_attn_implementation", None) == "sdpa"
    if switch:
        _register()
        config._attn_implementation = ATTENTION
    try:
        yield model
    finally:
        for m in patched:
            del m.forward
        if switch:
            config._attn_implementation = "sdpa"
