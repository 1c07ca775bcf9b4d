"""Run a padded batch as length-sorted pieces: the same mean loss and gradient, less padding.

A randomly drawn batch is padded to its longest example: on SST-2 up to 3x more tokens run
than the real ones. The heads' losses are means over the batch's examples, and an
example's output does not depend on how far it is padded on the right, so a batch's loss
is the sum of its pieces' losses, each weighted by its share of the examples, and so is
its gradient (up to float rounding; dropout draws other masks). Importance scores and
training steps keep their per-batch meaning while most padded tokens leave the passes.

This holds for the sequence-level heads (``labels``: classification, regression) on
right-padded batches; a span head's softmax (QA) runs over the padded positions too, and
left padding shifts BERT's positions, so such batches run whole (:func:`length_pieces`
gives one piece).

Example: rows of lengths ``[8] * 16 + [120] * 16`` run as the 16 short rows cut to 8
tokens and the 16 long ones: 2,048 tokens instead of 3,840.
"""

from __future__ import annotations

import torch

# A forward and backward pass costs about as much as this many extra (padded) tokens: a
# batch is cut where the padding a cut saves outweighs the cost of one more pass. Measured
# on the MiniLM-L6 MRPC teacher, 2 threads (benchmarks/results/pass_cost_mrpc.md): a pass
# costs ~15 ms plus ~0.47 ms per token, so ~32 tokens; the predicted Fisher pass over the
# 1,024-example calibration sample is flat from 16 to 64 (30.0-30.2 s) and 32.0 s at 256.
# 64 cuts the fewest times in that range.
PASS_TOKENS = 64
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def length_pieces(batch: dict) -> list[list[int]]:
    """Row indices of the pieces ``batch`` runs in; one piece (all rows) where it may not
    be cut (no sequence-level labels, no right-padded attention mask)."""
    mask = batch.get("attention_mask")
    right = mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all())
    if not (right and "labels" in batch):
        n = len(next(v for v in batch.values() if torch.is_tensor(v)))
        return [list(range(n))]
    return split_rows(mask.sum(1).tolist())


def each_piece(batch: dict):
    """Yield ``(piece, share, last)`` for the pieces ``batch`` runs in: the piece's batch
    (``batch`` itself when it is not cut), its share of the batch's examples (the weight of
    its mean loss), and whether it is the last piece."""
    pieces = length_pieces(batch)
    examples = sum(len(rows) for rows in pieces)
    for i, rows in enumerate(pieces):
        piece = batch if len(pieces) == 1 else take_rows(batch, rows)
        yield piece, len(rows) / examples, i == len(pieces) - 1


def split_rows(lengths: list[int], pass_tokens: int | None = None) -> list[list[int]]:
    """Row indices of the pieces a batch of examples of these token ``lengths`` is run in:
    the rows by length, cut to minimise padded tokens + ``pass_tokens`` (default
    ``PASS_TOKENS``) per pass (an exact split, quadratic in the rows of one batch)."""
    pass_tokens = PASS_TOKENS if pass_tokens is None else pass_tokens
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_len = [lengths[i] for i in order]
    n = len(sorted_len)
    cost, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # cost[j]: best split of the j shortest rows
        for i in range(j):
            c = cost[i] + sorted_len[j - 1] * (j - i) + pass_tokens
            if c < cost[j]:
                cost[j], cut[j] = c, i
    pieces, j = [], n
    while j > 0:
        pieces.append(order[cut[j]:j])
        j = cut[j]
    return pieces[::-1]


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The right-padded batch's ``rows``: per-example tensors (n, ...) indexed, token
    tensors (n, L) also cut to the longest of those rows."""
    mask = batch["attention_mask"]
    rows = torch.tensor(rows, device=mask.device)
    width = int(mask[rows].sum(1).max())
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 1 and len(v) == len(mask):
            v = v[rows]
            if k in TOKEN_KEYS:
                v = v[:, :width]
        out[k] = v
    return out
