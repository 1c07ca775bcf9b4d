"""benchmarks/pattern_retained.py on planted score matrices: each pattern keeps all of the
importance that was planted in its own shape, and no pattern beats the unstructured top-k."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("pattern_retained", BENCH / "pattern_retained.py")
pattern_retained = importlib.util.module_from_spec(spec)
sys.modules["pattern_retained"] = pattern_retained
spec.loader.exec_module(pattern_retained)

ROLES = ("ffn_in", "ffn_out")  # oriented (inner, outer)


def _shuffled(s: np.ndarray, rng) -> np.ndarray:
    return s[rng.permutation(s.shape[0])][:, rng.permutation(s.shape[1])]


def test_planted_units_are_kept_whole():
    rng = np.random.default_rng(0)
    inner, outer, g = 24, 6, 3
    live = rng.choice(inner, inner // g, replace=False)
    scores = {}
    for r in ROLES:
        s = np.full((inner, outer), 1e-9)
        s[live] = rng.uniform(1, 2, (len(live), outer))
        scores[r] = s
    out = pattern_retained.patterns(scores, g, heads=None, head_size=None)
    assert out["units"] == pytest.approx(1.0, abs=1e-6)
    assert out["pgb"] < 0.9  # one block per band cannot hold whole rows
    assert out["unstructured"] == pytest.approx(1.0, abs=1e-6)


def test_planted_blocks_are_found_and_bound_by_unstructured():
    rng = np.random.default_rng(1)
    inner, outer, g = 36, 12, 3
    p_in = rng.permutation(inner)
    scores, truth = {}, 0.0
    for r in ROLES:  # strong diagonal blocks over weak noise, shuffled on both sides
        s = rng.random((inner, outer)) * 0.05
        for b in range(g):
            s[b * 12:(b + 1) * 12, b * 4:(b + 1) * 4] += 1.0
        truth += sum(s[b * 12:(b + 1) * 12, b * 4:(b + 1) * 4].sum() for b in range(g))
        scores[r] = s[p_in][:, rng.permutation(outer)]
    truth /= sum(s.sum() for s in scores.values())
    out = pattern_retained.patterns(scores, g, heads=None, head_size=None)
    assert out["pgb"] == pytest.approx(truth, rel=1e-9)
    assert out["pgb-per-matrix"] == pytest.approx(truth, rel=1e-9)
    assert out["contiguous"] < truth - 0.2
    assert all(v is None or v <= out["unstructured"] + 1e-9 for v in out.values())


def test_head_units_need_whole_heads():
    rng = np.random.default_rng(2)
    heads, head_size = 4, 3
    scores = {r: rng.uniform(0, 1, (heads * head_size, 6))
              for r in ("query", "key", "value", "attn_out")}
    two = pattern_retained.patterns(scores, 2, heads=heads, head_size=head_size)
    three = pattern_retained.patterns(scores, 3, heads=heads, head_size=head_size)
    assert two["units"] is not None and 0 < two["units"] < 1
    assert three["units"] is None  # 4 heads do not split into thirds
    keep = pattern_retained.kept_units(scores, head_size, 2)
    assert len(keep) == 2 * head_size and all(np.diff(keep) > 0)
