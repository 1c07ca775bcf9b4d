"""Grouping search: known answers on planted block structure, validity, monotonicity."""

import numpy as np
import pytest

from pgb.arch import Dims
from pgb.grouping import (
    _band_sum,
    _cancel_cycles,
    _greedy_assign,
    _hungarian,
    _negative_cycle,
    _outer_fold,
    balanced_assign,
    candidate_groups,
    search_sublayer,
)


def planted(rng, n, h, groups, noise=0.05):
    """Importance with strong mass on G diagonal blocks, weak noise elsewhere."""
    s = rng.random((n, h)) * noise
    for b in range(groups):
        s[b * n // groups:(b + 1) * n // groups, b * h // groups:(b + 1) * h // groups] += 1.0
    return s


def blocks_of(g, role, n, h):
    """Sets of (inner, outer) index pairs per block of a Grouping."""
    G = g.groups
    inner, outer = g.inner_perm, g.outer_perms[role]
    return {(frozenset(inner[b * n // G:(b + 1) * n // G]),
             frozenset(outer[b * h // G:(b + 1) * h // G])) for b in range(G)}


@pytest.mark.parametrize("n,h,G", [(36, 12, 3), (148, 12, 4), (96, 24, 8)])
def test_planted_blocks_are_recovered_exactly_after_shuffling(n, h, G):
    rng = np.random.default_rng(n)
    s1, s2 = planted(rng, n, h, G), planted(rng, n, h, G)
    p_in, p1, p2 = rng.permutation(n), rng.permutation(h), rng.permutation(h)
    scores = {"ffn_in": s1[p_in][:, p1], "ffn_out": s2[p_in][:, p2]}
    g = search_sublayer(scores, G)
    # the true blocks, in shuffled coordinates
    inv_in, inv1, inv2 = np.argsort(p_in), np.argsort(p1), np.argsort(p2)
    for role, inv in (("ffn_in", inv1), ("ffn_out", inv2)):
        truth = {(frozenset(inv_in[b * n // G:(b + 1) * n // G]),
                  frozenset(inv[b * h // G:(b + 1) * h // G])) for b in range(G)}
        assert blocks_of(g, role, n, h) == truth


@pytest.mark.parametrize("n,h,G", [(36, 12, 3), (96, 24, 8)])
def test_shared_outer_recovers_planted_blocks_sharing_one_hidden_order(n, h, G):
    rng = np.random.default_rng(n)
    s1, s2 = planted(rng, n, h, G), planted(rng, n, h, G)
    p_in, p_out = rng.permutation(n), rng.permutation(h)  # one hidden order for both
    scores = {"ffn_in": s1[p_in][:, p_out], "ffn_out": s2[p_in][:, p_out]}
    g = search_sublayer(scores, G, shared_outer=True)
    assert np.array_equal(g.outer_perms["ffn_in"], g.outer_perms["ffn_out"])
    inv_in, inv_out = np.argsort(p_in), np.argsort(p_out)
    truth = {(frozenset(inv_in[b * n // G:(b + 1) * n // G]),
              frozenset(inv_out[b * h // G:(b + 1) * h // G])) for b in range(G)}
    assert blocks_of(g, "ffn_in", n, h) == truth == blocks_of(g, "ffn_out", n, h)


def test_shared_outer_retains_at_most_what_free_orders_retain():
    rng = np.random.default_rng(5)
    for G in (2, 4):
        scores = {r: rng.random((24, 24)) ** 4 for r in ("query", "key", "value", "attn_out")}
        free, shared = (search_sublayer(scores, G, heads=6, shared_outer=s) for s in (0, 1))
        assert len({tuple(p) for p in shared.outer_perms.values()}) == 1
        assert len({tuple(p) for p in free.outer_perms.values()}) > 1
        assert shared.retained() <= free.retained() + 1e-9
        assert shared.retained() >= search_sublayer(scores, G, heads=6,
                                                    permute=False).retained() - 1e-9


def test_permutations_valid_and_scores_consistent():
    rng = np.random.default_rng(1)
    scores = {"query": rng.random((24, 24)), "attn_out": rng.random((24, 24))}
    g = search_sublayer(scores, 4, heads=6)
    assert sorted(g.inner_perm) == list(range(24))
    for role, s in scores.items():
        assert sorted(g.outer_perms[role]) == list(range(24))
        mask = np.zeros_like(s)
        for b in range(4):
            band = slice(b * 6, (b + 1) * 6)
            mask[np.ix_(g.inner_perm[band], g.outer_perms[role][band])] = 1
        assert np.isclose((s * mask).sum(), g.block_scores[role].sum())
        assert np.isclose(g.totals[role], s.sum())


def test_search_never_worse_than_contiguous_blocks():
    rng = np.random.default_rng(2)
    for G in (2, 3, 4, 6):
        scores = {"ffn_in": rng.random((60, 12)) ** 4, "ffn_out": rng.random((60, 12)) ** 4}
        assert search_sublayer(scores, G).retained() >= \
            search_sublayer(scores, G, permute=False).retained() - 1e-12


def test_heads_stay_contiguous_when_whole_heads_are_grouped():
    rng = np.random.default_rng(3)
    heads, hs = 6, 4
    scores = {r: rng.random((24, 24)) for r in ("query", "key", "value", "attn_out")}
    g = search_sublayer(scores, 3, heads=heads)
    slots = g.inner_perm.reshape(heads, hs)
    for slot in slots:  # each head slot holds the dims of one original head, in order
        assert len(set(slot // hs)) == 1
        assert list(slot) == sorted(slot)


def test_bands_that_split_heads_keep_each_head_in_its_slot():
    rng = np.random.default_rng(4)
    scores = {r: rng.random((12, 12)) for r in ("query", "attn_out")}
    g = search_sublayer(scores, 4, heads=3)  # bands of 3 dims, heads of 4 dims
    head_of_position = g.inner_perm // 4
    assert list(head_of_position) == [0] * 4 + [1] * 4 + [2] * 4


def test_fixed_head_order_keeps_heads_in_place():
    rng = np.random.default_rng(5)
    scores = {r: rng.random((12, 12)) for r in ("query", "attn_out")}
    g = search_sublayer(scores, 3, heads=3, fixed_head_order=True)
    assert list(g.inner_perm // 4) == [0] * 4 + [1] * 4 + [2] * 4


def test_balanced_assign_is_optimal_on_small_case():
    scores = np.array([[5.0, 1.0], [4.0, 0.0], [3.0, 3.5], [0.0, 1.0]])
    # exactly two per band: best is {0,1}->0, {2,3}->1: 5+4+3.5+1
    assert list(balanced_assign(scores, 2)) == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["uniform", "ties", "heavy-tailed"])
def test_cycle_cancelling_matches_the_hungarian_optimum(kind):
    """The exact path (exchange cycles from a start) reaches the Hungarian objective, from
    the greedy start and from a random balanced one, ties included."""
    rng = np.random.default_rng(11)
    for groups in (2, 3, 4, 8, 16):
        for capacity in (1, 5, 24):
            n = groups * capacity
            scores = {"uniform": rng.random((n, groups)),
                      "ties": rng.integers(0, 3, (n, groups)).astype(float),
                      "heavy-tailed": rng.random((n, groups)) ** 8}[kind]
            best = scores[np.arange(n), _hungarian(scores, capacity)].sum()
            for start in (None, rng.permutation(np.arange(n) // capacity)):
                band = _cancel_cycles(scores, start if start is not None else
                                      _greedy_assign(scores, capacity), capacity)
                assert band is not None  # no fallback needed
                assert np.bincount(band, minlength=groups).tolist() == [capacity] * groups
                assert np.isclose(scores[np.arange(n), band].sum(), best, rtol=1e-12)
                via_api = balanced_assign(scores, capacity, start=start)
                assert np.isclose(scores[np.arange(n), via_api].sum(), best, rtol=1e-12)


def test_a_negative_cycle_is_found_and_a_positive_graph_has_none():
    w = np.array([[np.inf, 1.0, 5.0], [5.0, np.inf, -3.0], [1.0, 5.0, np.inf]])
    cycle = _negative_cycle(w, 1e-12)  # 0 -> 1 -> 2 -> 0 costs 1 - 3 + 1 = -1
    assert cycle is not None and sorted(cycle) == [0, 1, 2]
    i = cycle.index(0)
    assert cycle[i:] + cycle[:i] == [0, 1, 2]  # each band sends to the next
    w[1, 2] = -1.0  # the cycle now costs +1
    assert _negative_cycle(w, 1e-12) is None


def test_bad_group_count_is_rejected():
    with pytest.raises(ValueError, match="groups 5 must divide"):
        search_sublayer({"ffn_in": np.ones((12, 8))}, 5)


def test_candidate_groups_divide_both_sizes():
    dims = Dims(layers=2, hidden=384, heads=12, intermediate=1536)
    assert candidate_groups("ffn", dims) == [1, 2, 3, 4, 6, 8, 12, 16]
    odd = Dims(layers=2, hidden=36, heads=4, intermediate=74)
    assert candidate_groups("ffn", odd) == [1, 2]
    assert candidate_groups("attn", odd) == [1, 2, 3, 4, 6, 12]


def test_two_bands_are_sorted_in_one_round(monkeypatch):
    """With G = 2 a round moves every gaining pair at once (the k-th cheapest exchanges in
    layers), so a second Bellman-Ford only confirms the optimum."""
    import pgb.grouping as grouping

    rng = np.random.default_rng(3)
    scores = rng.random((40, 2))
    calls = []
    real = grouping._negative_cycle
    monkeypatch.setattr(grouping, "_negative_cycle", lambda w, tol: calls.append(1) or real(w, tol))
    band = _cancel_cycles(scores, np.arange(40) % 2, 20)
    assert len(calls) == 2
    best = scores[np.arange(40), _hungarian(scores, 20)].sum()
    assert np.isclose(scores[np.arange(40), band].sum(), best, rtol=1e-12)


@pytest.mark.parametrize("balanced", [True, False])
def test_band_sums_and_outer_folds_equal_direct_sums(balanced):
    """Both band sums gather rows (of the scores, or of their transpose): equal to summing
    the indices of each band directly, balanced bands or not (the one-hot product)."""
    rng = np.random.default_rng(3)
    s = rng.random((12, 18))  # (inner, outer)
    in_band = rng.permutation(np.repeat(np.arange(3), 4)) if balanced else \
        np.array([0] * 6 + [1] * 2 + [2] * 4)
    out_band = rng.permutation(np.repeat(np.arange(3), 6))
    direct_in = np.stack([s[in_band == b].sum(0) for b in range(3)])  # (G, outer)
    direct_out = np.stack([s[:, out_band == b].sum(1) for b in range(3)], axis=1)  # (inner, G)
    np.testing.assert_allclose(_band_sum(s, in_band, 3), direct_in, rtol=1e-12)
    np.testing.assert_allclose(_outer_fold(np.ascontiguousarray(s.T), out_band, 3),
                               direct_out, rtol=1e-12)


def _greedy_one_at_a_time(scores, capacity):
    """The greedy's definition: by regret, each item to its best band with room."""
    prefs = np.argsort(-scores, axis=1)
    top2 = np.take_along_axis(scores, prefs[:, :2], axis=1)
    room = np.full(scores.shape[1], capacity)
    band = np.empty(scores.shape[0], dtype=np.int64)
    for i in np.argsort(top2[:, 1] - top2[:, 0], kind="stable"):
        b = next(b for b in prefs[i] if room[b])
        band[i], room[b] = b, room[b] - 1
    return band


@pytest.mark.parametrize("ties", [False, True])
def test_greedy_in_phases_equals_one_item_at_a_time(ties):
    rng = np.random.default_rng(5)
    for _ in range(60):
        g, capacity = int(rng.choice([2, 3, 4, 8, 16])), int(rng.integers(1, 40))
        scores = rng.random((g * capacity, g))
        if ties:
            scores = np.round(scores * 3) / 3
        band = _greedy_assign(scores, capacity)
        assert np.array_equal(band, _greedy_one_at_a_time(scores, capacity))
        assert np.bincount(band, minlength=g).tolist() == [capacity] * g
