"""Grouping search: permute a sublayer's matrices so that importance gathers on G diagonal blocks.

The matrices of one sublayer share their inner dimension (attention heads x head size, or
the FFN intermediate), so they share one inner partition into G bands; each matrix gets
its own partition of the outer (hidden) side. The search alternates two exact steps,
each the optimal balanced assignment given the other side, solved with the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``) on band scores:

1. outer step, per matrix: move every hidden index to the band whose inner rows hold most
   of its importance (each band takes H/G indices);
2. inner step, for the sublayer: move every inner item (an FFN neuron, a head, or a head
   dim) to the band whose outer indices hold most of its importance, summed over matrices.

Started from the identity (contiguous blocks), the retained importance never decreases,
so the permuted grouping is never worse than the unpermuted one. This is the
permutation-grouping heuristic of Zhao and Luk (2019), applied to whole sublayers.

Example::

    >>> s = {"ffn_in": scores_in.T ... }          # each (inner, outer)
    >>> g = search_sublayer(s, groups=4, inner="free")
    >>> g.retained()                               # fraction of importance kept
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .arch import INNER_IS_ROWS, Dims


@dataclass(frozen=True)
class Grouping:
    """Result of the search for one sublayer and one group count.

    ``inner_perm`` orders the inner dimension band by band; ``outer_perms[role]`` orders
    the hidden side of each matrix; ``block_scores[role][b]`` is the importance inside
    block b and ``totals[role]`` the matrix's whole importance.
    """

    groups: int
    inner_perm: np.ndarray
    outer_perms: dict[str, np.ndarray]
    block_scores: dict[str, np.ndarray]
    totals: dict[str, float]

    def retained(self) -> float:
        """Fraction of the sublayer's importance inside the G blocks (rho(G))."""
        kept = sum(float(s.sum()) for s in self.block_scores.values())
        return kept / max(sum(self.totals.values()), 1e-30)


def balanced_assign(scores: np.ndarray, capacity: int, exact_up_to: int = 512,
                    start: np.ndarray | None = None) -> np.ndarray:
    """Band of each row maximising ``sum scores[i, band[i]]``, every band holding ``capacity``.

    scores: (n, G) with n == G * capacity. Exact up to ``exact_up_to`` rows: exchange
    cycles are cancelled from ``start`` (a balanced assignment, e.g. the previous sweep's)
    or from the greedy one until none gains (:func:`_cancel_cycles`), with the Hungarian
    algorithm as the fallback. Beyond, the regret-ordered greedy (O(n G log n)) that the
    search only accepts when it improves on the current assignment.
    """
    n, g = scores.shape
    if n != g * capacity:
        raise ValueError(f"{n} items cannot fill {g} bands of {capacity}")
    if g == 1:
        return np.zeros(n, dtype=np.int64)
    if n > exact_up_to:
        return _greedy_assign(scores, capacity)
    if start is None or np.bincount(start, minlength=g).tolist() != [capacity] * g:
        start = _greedy_assign(scores, capacity)
    band = _cancel_cycles(scores, start, capacity)
    return band if band is not None else _hungarian(scores, capacity)


def _hungarian(scores: np.ndarray, capacity: int) -> np.ndarray:
    """The exact balanced assignment by the Hungarian algorithm on an (n, n) expansion."""
    cost = -np.repeat(scores, capacity, axis=1)  # (n, n): column j is a seat of band j // cap
    rows, cols = linear_sum_assignment(cost)
    band = np.empty(len(scores), dtype=np.int64)
    band[rows] = cols // capacity
    return band


def _cancel_cycles(scores: np.ndarray, band: np.ndarray, capacity: int) -> np.ndarray | None:
    """Improve a balanced assignment until it is optimal, or None if that stalls.

    With every band full, the only changes are cyclic exchanges: item j moves from band b
    to b', another from b' on, ... back to b. Moving from b to b' costs at least
    ``W[b, b'] = min over j in b of (scores[j, b] - scores[j, b'])``, so the assignment is
    optimal exactly when the G-node graph W has no negative cycle (a cycle of distinct
    bands moves distinct items). Each round finds one with Bellman-Ford and applies it,
    in layers: the k-th cheapest item of every arc of the cycle moves too while the k-th
    layer's losses still sum below zero (items' gains are independent, every band still
    sends and receives as many; for G = 2 one round sorts the two bands' exchanges). The
    objective rises every round. Far cheaper than the Hungarian algorithm on the (n, n)
    expansion when G is small and the start is near the optimum.
    """
    n, g = scores.shape
    band = band.copy()
    tol = 1e-12 * max(float(np.abs(scores).sum()), 1e-300)
    for _ in range(4 * n):
        order = np.argsort(band, kind="stable")  # items band by band, capacity each
        own = scores[order, band[order]]
        moves = (own[:, None] - scores[order]).reshape(g, capacity, g)  # loss of j: b -> b'
        pick = moves.argmin(axis=1)  # (G, G): cheapest item of band b to send to b'
        w = np.take_along_axis(moves, pick[:, None, :], axis=1)[:, 0, :]
        np.fill_diagonal(w, np.inf)
        cycle = _negative_cycle(w, tol)
        if cycle is None:
            return band
        arcs = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        ranked = [np.argsort(moves[b, :, b_next], kind="stable") for b, b_next in arcs]
        layers = sum(moves[b, r, b_next] for (b, b_next), r in zip(arcs, ranked, strict=True))
        depth = int((layers < -tol).sum())  # layers' sums never fall: the leading ones
        for (b, b_next), r in zip(arcs, ranked, strict=True):
            band[order[b * capacity + r[:depth]]] = b_next
    return None


def _negative_cycle(w: np.ndarray, tol: float) -> list[int] | None:
    """Bands of a cycle of total weight below ``-tol`` in the dense graph ``w``, or None."""
    g = len(w)
    dist, pred = np.zeros(g), np.full(g, -1)
    for _ in range(g):  # Bellman-Ford from a virtual source joined to every band
        via = dist[:, None] + w  # (u, v): reach v through u
        u = via.argmin(axis=0)
        best = via[u, np.arange(g)]
        better = best < dist - tol
        if not better.any():
            return None
        dist[better], pred[better] = best[better], u[better]
    v = int(np.flatnonzero(better)[0])
    for _ in range(g):  # walk back onto the cycle
        v = int(pred[v])
        if v < 0:
            return None
    cycle, u = [v], int(pred[v])
    while u != v and len(cycle) <= g:
        if u < 0:
            return None
        cycle.append(u)
        u = int(pred[u])
    cycle.reverse()  # pred points backwards: reversed, each band sends to the next
    cost = sum(w[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True))
    return cycle if u == v and cost < -tol else None


def _greedy_assign(scores: np.ndarray, capacity: int) -> np.ndarray:
    """Items with most to lose go first, each to its best band that still has room.

    Run in phases rather than item by item: until some band fills, every item takes its
    best open band, so a phase is one vectorised pass up to the first item whose band is
    full; then that band closes (at most G phases, the same result as one item at a time).
    """
    n, g = scores.shape
    prefs = np.argsort(-scores, axis=1)  # (n, G) bands by preference
    top2 = np.take_along_axis(scores, prefs[:, :2], axis=1)
    order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")  # largest regret first
    rank = np.empty_like(prefs)  # rank[i, b]: place of band b in item i's preferences
    np.put_along_axis(rank, prefs, np.arange(g)[None, :], axis=1)
    rank = rank[order]
    room = np.full(g, capacity)
    band = np.empty(n, dtype=np.int64)
    pos = 0
    while pos < n:
        choice = np.where(room > 0, rank[pos:], g).argmin(axis=1)  # best open band
        wanted = np.bincount(choice, minlength=g)
        # the phase ends at the first item whose band has no room left
        k = min([len(choice)] + [int(np.flatnonzero(choice == b)[room[b]])
                                 for b in np.flatnonzero(wanted > room)])
        band[order[pos:pos + k]] = choice[:k]
        room -= np.bincount(choice[:k], minlength=g)
        pos += k
    return band


def _slot_assign(scores: np.ndarray, heads: int, groups: int) -> np.ndarray:
    """Band of each inner dim when heads keep their slots (fixed order, uneven bands).

    Head h occupies positions [h*hs, (h+1)*hs); band g covers [g*w, (g+1)*w). A head's
    dims may only go to the bands its slot overlaps, in the numbers the overlaps fix.
    """
    n = scores.shape[0]
    hs, width = n // heads, n // groups
    band = np.empty(n, dtype=np.int64)
    for h in range(heads):
        lo, hi = h * hs, (h + 1) * hs
        bands = list(range(lo // width, (hi - 1) // width + 1))
        seats = np.concatenate([np.full(min(hi, (b + 1) * width) - max(lo, b * width), b)
                                for b in bands])
        cost = -scores[lo:hi][:, seats]  # (hs, hs): dim x seat
        rows, cols = linear_sum_assignment(cost)
        band[lo + rows] = seats[cols]
    return band


class _Inner:
    """How inner items may move: free dims (FFN), whole heads, or dims in fixed head slots."""

    def __init__(self, n: int, groups: int, heads: int | None, fixed_head_order: bool):
        self.n, self.groups, self.heads = n, groups, heads
        if heads is None:
            self.mode = "free"
        elif groups <= heads and heads % groups == 0 and not fixed_head_order:
            self.mode = "heads"
        else:
            self.mode = "slots"

    def identity(self) -> np.ndarray:
        return np.arange(self.n) // (self.n // self.groups)

    def assign(self, scores: np.ndarray) -> np.ndarray:
        """Best band per inner dim given its (n, G) band scores."""
        if self.mode == "free":
            return balanced_assign(scores, self.n // self.groups)
        if self.mode == "heads":
            per_head = scores.reshape(self.heads, -1, self.groups).sum(axis=1)
            head_band = balanced_assign(per_head, self.heads // self.groups)
            return np.repeat(head_band, self.n // self.heads)
        return _slot_assign(scores, self.heads, self.groups)

    def order(self, band: np.ndarray) -> np.ndarray:
        """Inner permutation: by band, then head slot, then index (keeps heads contiguous)."""
        head = np.arange(self.n) // (self.n // (self.heads or self.n))
        return np.lexsort((np.arange(self.n), head, band))


def search_sublayer(scores: dict[str, np.ndarray], groups: int, heads: int | None = None,
                    fixed_head_order: bool = False, iters: int = 10,
                    permute: bool = True, tol: float = 1e-4,
                    shared_outer: bool = False) -> Grouping:
    """Group one sublayer's matrices into ``groups`` blocks sharing the inner partition.

    scores: role -> importance oriented (inner, outer). heads: number of attention heads
    (None for the FFN). permute=False keeps contiguous blocks (the no-permutation ablation).
    shared_outer=True gives every matrix the same outer (hidden-size) partition, chosen
    for their summed importance: the compact model can then run the sublayer on a
    residual stream kept in that order, with no gather or scatter inside it.
    The sweeps stop when one gains less than ``tol`` (relative).
    """
    mats = list(scores)
    # both layouts row-major, so that every band sum gathers whole rows (a column gather
    # of a (384, 1536) matrix costs several times a row gather of its transpose)
    scores = {m: np.ascontiguousarray(s) for m, s in scores.items()}
    by_outer = {m: np.ascontiguousarray(s.T) for m, s in scores.items()}  # (outer, inner)
    n, h = scores[mats[0]].shape
    if n % groups or h % groups:
        raise ValueError(f"groups {groups} must divide the inner size {n} and hidden size {h}")
    inner = _Inner(n, groups, heads, fixed_head_order)
    in_band = inner.identity()
    out_band = {m: np.arange(h) // (h // groups) for m in mats}
    best = -np.inf
    stale = permute and groups > 1  # out_band not yet optimal for in_band
    for _ in range(iters if permute and groups > 1 else 0):
        out_band, stale = _outer_bands(scores, in_band, groups, shared_outer, out_band), False
        gain = sum(_outer_fold(by_outer[m], out_band[m], groups) for m in mats)  # (n, G)
        new_band = inner.assign(gain)
        value, current = (gain[np.arange(n), b].sum() for b in (new_band, in_band))
        if value < current:  # a heuristic step that lost: keep the current bands
            new_band, value = in_band, current
        if value <= best * (1 + tol):
            break
        best, in_band, stale = value, new_band, new_band is not in_band
    if stale:  # the outer side, re-optimised for the final inner bands
        out_band = _outer_bands(scores, in_band, groups, shared_outer, out_band)
    return _finish(scores, groups, inner, in_band, out_band)


def _outer_bands(scores: dict[str, np.ndarray], in_band: np.ndarray, groups: int,
                 shared: bool, start: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """Best outer band per hidden index of each matrix (one partition for all if shared);
    ``start``: the previous sweep's bands, where the exact assignment starts from."""
    h = next(iter(scores.values())).shape[1]
    start = start or {}
    if shared:
        band = balanced_assign(sum(_band_sum(s, in_band, groups) for s in scores.values()).T,
                               h // groups, start=next(iter(start.values()), None))
        return dict.fromkeys(scores, band)
    return {m: balanced_assign(_band_sum(s, in_band, groups).T, h // groups,
                               start=start.get(m))
            for m, s in scores.items()}


def _band_sum(s: np.ndarray, band: np.ndarray, groups: int) -> np.ndarray:
    """(G, columns): sums of the rows of ``s`` in each band (for ``s`` (inner, outer) and
    the inner bands: the importance of each outer index inside each band). Balanced bands
    (every search step keeps them so) are gathered in band order and summed by reshaping:
    no BLAS call, whose threads stall and fight with torch's on a busy 2-core machine (on a
    quiet one both ways cost about the same). Unbalanced bands, which the search never
    makes, take the one-hot product."""
    size = len(band)
    if np.bincount(band, minlength=groups).max() * groups == size:  # balanced
        order = np.argsort(band, kind="stable")
        return s[order].reshape(groups, size // groups, -1).sum(axis=1)
    onehot = np.zeros((size, groups))
    onehot[np.arange(size), band] = 1.0
    return onehot.T @ s


def _outer_fold(s_t: np.ndarray, out_band: np.ndarray, groups: int) -> np.ndarray:
    """(inner, G): importance of each inner item inside each outer band; ``s_t`` the
    (outer, inner) scores."""
    return _band_sum(s_t, out_band, groups).T


def _finish(scores, groups, inner, in_band, out_band) -> Grouping:
    inner_perm = inner.order(in_band)
    outer_perms, blocks, totals = {}, {}, {}
    for m, s in scores.items():
        outer_perms[m] = np.lexsort((np.arange(len(out_band[m])), out_band[m]))
        bs = _band_sum(s, in_band, groups)  # (G, outer)
        blocks[m] = np.array([bs[b, out_band[m] == b].sum() for b in range(groups)])
        totals[m] = float(s.sum())
    return Grouping(groups, inner_perm, outer_perms, blocks, totals)


def orient(role: str, score: np.ndarray) -> np.ndarray:
    """A matrix's (out, in) scores turned to (inner, outer)."""
    return score if INNER_IS_ROWS[role] else score.T


def candidate_groups(kind: str, dims: Dims, max_groups: int = 16) -> list[int]:
    """Group counts the search considers for a sublayer: divisors of both of its sizes.

    Attention bands may split heads (dims move inside a head's slot), so any G dividing
    the hidden size works; the FFN needs G to divide hidden and intermediate sizes.
    """
    inner = dims.hidden if kind == "attn" else dims.intermediate
    return [g for g in range(1, max_groups + 1)
            if dims.hidden % g == 0 and inner % g == 0 and g in _NICE]


# Group counts with few prime factors keep blocks friendly to matmul kernels.
_NICE = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32}
