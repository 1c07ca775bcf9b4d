"""The teacher's per-layer activations on the calibration sample, recorded during the Fisher
pass so that compensation does not run the teacher over the sample a second time.

Compensation needs, per encoder layer and calibration example, the teacher's valid
tokens of: the layer input ``x`` (the input of the query matrix), the attention branch
output ``attn`` (the output of attention-out), the FFN input ``x2`` (the input of FFN-in)
and the FFN branch output ``ffn`` (the output of FFN-out). The Fisher pass of the same
teacher on the same sample computes all of them in its forward passes (eval mode, no
dropout), batched otherwise (seeded random batches cut into length-sorted pieces,
instead of batches by length). :class:`TeacherTrace` hooks them there, per example, and
hands them back per compensation batch in its token order.

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

from .arch import dims_of, get_matrix

log = logging.getLogger(__name__)

# The most bytes a trace holds (4 tensors of hidden floats per valid token and layer),
# and at most this share of the memory available when recording starts; a sample needing
# more is not recorded (MiniLM-L6 on 1,024 MRPC pairs: about 2 GB).
TRACE_BYTES = 4 * 2**30
TRACE_SHARE = 0.25


def available_bytes() -> int | None:
    """Physical memory available now (Linux), or None where the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
KEYS = ("x", "attn", "x2", "ffn")


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
    types = batch.get("token_type_ids")
    keys = []
    for r, n in enumerate(lengths.tolist()):
        key = ids[r, :n].cpu().numpy().tobytes()
        if types is not None:
            key += b"|" + types[r, :n].cpu().numpy().tobytes()
        keys.append(key)
    return keys


class TeacherTrace:
    """Per layer and example (by content key), the teacher's valid tokens of ``KEYS``."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.layers = dims_of(teacher).layers
        self.hidden = teacher.config.hidden_size
        self.store: list[dict[bytes, dict[str, torch.Tensor]]] = [{} for _ in range(self.layers)]

    def fits(self, batches: list[dict]) -> bool:
        """Whether recording ``batches`` stays within ``TRACE_BYTES`` and ``TRACE_SHARE`` of
        the available memory."""
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                     else b["input_ids"].numel() for b in batches)
        need = len(KEYS) * self.layers * self.hidden * 4 * tokens
        free = available_bytes()
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
        for layer in range(self.layers):
            handles += [
                get_matrix(t, layer, "query").register_forward_pre_hook(pre(keep(layer, "x"))),
                get_matrix(t, layer, "attn_out").register_forward_hook(post(keep(layer, "attn"))),
                get_matrix(t, layer, "ffn_in").register_forward_pre_hook(pre(keep(layer, "x2"))),
                get_matrix(t, layer, "ffn_out").register_forward_hook(post(keep(layer, "ffn")))]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def covers(self, keys_per_batch: list[list[bytes] | None]) -> bool:
        """Whether every row of these batches (their keys) was recorded in every layer."""
        return all(keys is not None and all(len(store.get(k, ())) == len(KEYS) for k in keys)
                   for keys in keys_per_batch for store in self.store)

    def refs(self, layer: int, keys_per_batch: list[list[bytes]]) -> list[dict]:
        """Per batch (its rows' keys), the layer's ``KEYS`` tensors of its valid tokens in
        row order, (n_valid, hidden) each (what ``compensate._teacher_layer`` gives)."""
        store = self.store[layer]
        return [{name: torch.cat([store[k][name] for k in keys]) for name in KEYS}
                for keys in keys_per_batch]
