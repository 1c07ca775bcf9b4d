"""Fisher importance run as length-sorted pieces of each batch equals the whole-batch pass
(sequence-level heads, right padding; QA and left-padded batches run whole)."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_model

from pgb import pieces as pieces_mod
from pgb.importance import importance_scores
from pgb.pieces import split_rows

LENGTHS = (11, 5, 8, 3, 11, 7, 4)


def ragged_batch(labels: str, left: bool = False, seed: int = 0) -> dict:
    """Rows of LENGTHS tokens padded to the longest, on the right (or left)."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(5, VOCAB, (n, width), generator=g)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, k in enumerate(LENGTHS):
        cols = slice(width - k, width) if left else slice(0, k)
        mask[i, cols] = 1
    ids[mask == 0] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels == "class":
        batch["labels"] = torch.randint(0, 3, (n,), generator=g)
    elif labels == "regression":
        batch["labels"] = torch.rand(n, generator=g) * 5
    else:  # QA: answer spans inside each row's own tokens
        starts = torch.tensor([(width - k if left else 0) + 1 for k in LENGTHS])
        batch["start_positions"], batch["end_positions"] = starts, starts + 1
    return batch


def passes(model, batches, monkeypatch, pass_tokens: int) -> tuple[dict, int]:
    """Fisher scores with ``PASS_TOKENS = pass_tokens`` and how many forward passes ran."""
    monkeypatch.setattr(pieces_mod, "PASS_TOKENS", pass_tokens)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return importance_scores(model, batches, "fisher", progress=False), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("family,labels,left", [
    ("bert", "class", False), ("bert", "class", True), ("distilbert", "class", False),
    ("roberta", "regression", False), ("bert", "qa", False), ("mpnet", "qa", True)])
def test_fisher_in_pieces_equals_the_whole_batch(family, labels, left, monkeypatch):
    if family not in FAMILIES:
        pytest.fail(f"{family} is not a tiny family")
    num_labels = {"class": 3, "regression": 1, "qa": 2}[labels]
    model = tiny_model(family, num_labels=num_labels, qa=labels == "qa")
    batches = [ragged_batch(labels, left, seed) for seed in range(2)]
    whole, whole_calls = passes(model, batches, monkeypatch, 10**9)
    pieces, piece_calls = passes(model, batches, monkeypatch, 0)
    # cut into pieces (5 distinct lengths a batch); left padding shifts BERT's positions
    # and the QA span softmax covers padded positions, so those batches run whole
    whole_only = left or labels == "qa"
    assert whole_calls == 2 and (piece_calls == 2 if whole_only else piece_calls > 2 * 4)
    assert whole.keys() == pieces.keys()
    for name, s in whole.items():
        assert s.abs().max() > 0, name
        # float32 gradients summed in another order: entries far below the largest
        # (cancelling sums) move by ~1e-11 absolute
        torch.testing.assert_close(pieces[name], s, rtol=1e-4, atol=1e-6 * s.abs().max())


def _brute_force(lengths: list[int], pass_tokens: int) -> float:
    """Least padded tokens + pass_tokens per pass over every cut of the sorted rows."""
    ls = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product((False, True), repeat=len(ls) - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(ls)]
        cost = sum(ls[j - 1] * (j - i) + pass_tokens
                   for i, j in zip(bounds, bounds[1:], strict=False))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_pieces_are_the_cheapest_cut_of_the_sorted_rows(seed, monkeypatch):
    monkeypatch.setattr(pieces_mod, "PASS_TOKENS", 20)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 60, (9,), generator=g).tolist()
    pieces = split_rows(lengths)
    assert sorted(i for p in pieces for i in p) == list(range(len(lengths)))  # a partition
    tops = [max(lengths[i] for i in p) for p in pieces]
    assert all(max(lengths[i] for i in p) <= min(lengths[i] for i in q)
               for p, q in zip(pieces, pieces[1:], strict=False))  # in length order
    cost = sum(t * len(p) + 20 for t, p in zip(tops, pieces, strict=True))
    assert cost == _brute_force(lengths, 20)


def test_equal_lengths_stay_one_piece_and_far_apart_ones_split():
    assert len(split_rows([40] * 32)) == 1
    short_long = [8] * 16 + [120] * 16
    assert [sorted(p) for p in split_rows(short_long)] == [list(range(16)), list(range(16, 32))]


def test_each_piece_weights_add_up_and_only_the_last_is_last(monkeypatch):
    monkeypatch.setattr(pieces_mod, "PASS_TOKENS", 0)
    batch = ragged_batch("class")
    got = list(pieces_mod.each_piece(batch))
    assert len(got) == len(set(LENGTHS))
    assert sum(share for _, share, _ in got) == pytest.approx(1.0)
    assert [last for *_, last in got] == [False] * (len(got) - 1) + [True]
    for piece, share, _ in got:  # every row of a piece is as long as its tokens
        assert share == len(piece["labels"]) / len(LENGTHS)
        assert bool(piece["attention_mask"][:, -1].any())
    assert sorted(int(k) for p, *_ in got for k in p["attention_mask"].sum(1)) == \
        sorted(LENGTHS)
    whole = list(pieces_mod.each_piece(ragged_batch("qa")))  # not cut: the batch itself
    assert len(whole) == 1 and whole[0][1:] == (1.0, True)
