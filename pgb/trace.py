"""The teacher's per-layer activations on the calibration sample, recorded during the Fisher
pass so that compensation does not run the teacher over the sample a second time.

Compensation needs, per encoder layer and calibration example, the teacher's valid
tokens of: the layer input ``x`` (the input of the query matrix), the attention branch
output ``attn`` (the output of attention-out), the FFN input ``x2`` (the input of FFN-in)
and the FFN branch output ``ffn`` (the output of FFN-out). The Fisher pass of the same
teacher on the same sample computes all of them in its forward passes (eval mode, no
dropout), batched otherwise (seeded random batches cut into length-sorted pieces,
instead of batches by length). :class:`TeacherTrace` hooks the two branch outputs of
every layer and the input of the first there, per example; the rest follows from them
as in the post-LayerNorm layer, ``x2 = LN_attn(x + attn)`` and the next layer's
``x = LN_ffn(x2 + ffn)`` (the teacher's own LayerNorms), and :meth:`TeacherTrace.replay`
hands all four back per layer and compensation batch, in its token order.

Examples are matched by content (their valid input ids and token types): a right-padded
example's activations do not depend on its batch, so equal inputs have equal activations
(up to float rounding from the other batch shapes). Left-padded batches (BERT's positions
shift with the padding) are not recorded; an example the trace lacks, or a trace over its
memory budget, makes compensation run the teacher itself, as without a trace.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os

import torch
from torch import nn

from .arch import dims_of, get_arch, get_matrix, layer_module

log = logging.getLogger(__name__)

# The most bytes a trace holds (2 tensors of hidden floats per valid token and layer),
# and at most this share of the memory available when recording starts; a sample needing
# more is not recorded (MiniLM-L6 on 1,024 MRPC pairs: about 1 GB).
TRACE_BYTES = 4 * 2**30
TRACE_SHARE = 0.25


def available_bytes(device: torch.device | None = None) -> int | None:
    """Memory available now where the trace lives: the CUDA device's free memory, or the
    host's physical memory (Linux); None where the system does not say."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


RECORDED = ("attn", "ffn")  # per layer, and "x" of layer 0


def example_keys(batch: dict) -> list[bytes] | None:
    """Per row of a right-padded batch, a key of its content (valid input ids and token
    types); None for a batch that is not right-padded."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = mask.bool()
    lengths = mask.sum(1)
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    ids = ids.cpu().numpy()  # one transfer, not one per row
    types = batch.get("token_type_ids")
    types = None if types is None else types.cpu().numpy()
    keys = []
    for r, n in enumerate(lengths.tolist()):
        key = ids[r, :n].tobytes()
        if types is not None:
            key += b"|" + types[r, :n].tobytes()
        keys.append(key)
    return keys


class TeacherTrace:
    """Per layer and example (by content key), the teacher's valid tokens of ``RECORDED``
    (and of ``x`` in layer 0)."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.layers = dims_of(teacher).layers
        self.hidden = teacher.config.hidden_size
        self.store: list[dict[bytes, dict[str, torch.Tensor]]] = [{} for _ in range(self.layers)]

    def fits(self, batches: list[dict]) -> bool:
        """Whether recording ``batches`` stays within ``TRACE_BYTES`` and ``TRACE_SHARE`` of
        the memory available on the teacher's device (the trace is kept there)."""
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                     else b["input_ids"].numel() for b in batches)
        need = (len(RECORDED) * self.layers + 1) * self.hidden * 4 * tokens
        free = available_bytes(next(self.teacher.parameters()).device)
        ok = need <= TRACE_BYTES and (free is None or need <= TRACE_SHARE * free)
        if not ok:
            log.info("the teacher's activations (%.1f GB) are not kept for compensation: "
                     "over the trace's budget; compensation runs the teacher", need / 1e9)
        return ok

    @contextlib.contextmanager
    def recording(self):
        """Hooks on the teacher that record every forward pass run inside the block."""
        rows: dict = {}

        def start(_model, _args, kwargs):
            keys = example_keys(kwargs) if "input_ids" in kwargs else None
            rows["keys"] = keys  # None: this pass is not recorded
            if keys is not None:
                mask = kwargs.get("attention_mask", torch.ones_like(kwargs["input_ids"]))
                lengths = mask.sum(1).tolist()
                rows["spans"] = list(zip(keys, itertools.accumulate([0] + lengths[:-1]), lengths,
                                         strict=True))
                flat = mask.reshape(-1).bool()
                rows["valid"] = None if bool(flat.all()) else flat.nonzero().squeeze(1)

        def keep(layer: int, name: str):
            def fn(t: torch.Tensor) -> None:
                if rows.get("keys") is None:
                    return
                # one copy of the pass's valid tokens; each example keeps a view of its rows
                flat = t.detach().reshape(-1, t.shape[-1])
                dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
                block = flat.to(dtype, copy=True) if rows["valid"] is None else \
                    flat.index_select(0, rows["valid"]).to(dtype)
                store = self.store[layer]
                for key, start, n in rows["spans"]:
                    store.setdefault(key, {})[name] = block[start:start + n]
            return fn

        def pre(fn):
            return lambda _m, args: fn(args[0])

        def post(fn):
            return lambda _m, _args, out: fn(out)

        t = self.teacher
        handles = [t.register_forward_pre_hook(start, with_kwargs=True)]
        handles.append(get_matrix(t, 0, "query").register_forward_pre_hook(pre(keep(0, "x"))))
        for layer in range(self.layers):
            handles += [
                get_matrix(t, layer, "attn_out").register_forward_hook(post(keep(layer, "attn"))),
                get_matrix(t, layer, "ffn_out").register_forward_hook(post(keep(layer, "ffn")))]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def covers(self, keys_per_batch: list[list[bytes] | None]) -> bool:
        """Whether every row of these batches (their keys) was recorded in every layer."""
        def has(layer: int, k: bytes) -> bool:
            names = self.store[layer].get(k, {})
            return all(n in names for n in RECORDED) and (layer > 0 or "x" in names)
        return all(keys is not None and all(has(layer, k) for k in keys)
                   for keys in keys_per_batch for layer in range(self.layers))

    def replay(self, keys_per_batch: list[list[bytes]]):
        """Per layer, in order: per batch (its rows' keys), the layer's ``x``, ``attn``,
        ``x2`` and ``ffn`` tensors of its valid tokens in row order, (n_valid, hidden) each
        (what ``compensate._teacher_layer`` gives)."""
        spec = get_arch(self.teacher)

        def rows(layer: int, name: str, keys: list[bytes]) -> torch.Tensor:
            return torch.cat([self.store[layer][k][name] for k in keys])

        def norm(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            dtype = module.weight.dtype  # as the layer runs it, back in the stored dtype
            return module(a.to(dtype) + b.to(dtype)).to(a.dtype)

        xs = [rows(0, "x", keys) for keys in keys_per_batch]
        for layer in range(self.layers):
            block = layer_module(self.teacher, layer)
            attn_norm, ffn_norm = (block.get_submodule(spec.attn_norm),
                                   block.get_submodule(spec.ffn_norm))
            refs = []
            for i, keys in enumerate(keys_per_batch):
                attn, ffn = rows(layer, "attn", keys), rows(layer, "ffn", keys)
                x2 = norm(attn_norm, xs[i], attn)
                refs.append({"x": xs[i], "attn": attn, "x2": x2, "ffn": ffn})
                xs[i] = norm(ffn_norm, x2, ffn)
            yield refs
