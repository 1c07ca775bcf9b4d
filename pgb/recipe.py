"""The recipe: which blocks of which matrix survive, with the permutations that define them.

A recipe is plain data (JSON) and is all the compact form needs. For one sublayer
(attention: query, key, value, attn_out; FFN: ffn_in, ffn_out) it holds

- ``groups`` G and ``inner_perm``: an order of the sublayer's inner dimension (attention
  heads x head size, or the FFN intermediate). Inner band b is
  ``inner_perm[b*n/G:(b+1)*n/G]``; every matrix of the sublayer shares it, so the compact
  model stores its inner dimension in this order and pays no gather for it.
- per matrix, ``outer_perm`` (an order of the hidden size, band b is the b-th chunk of
  H/G) and ``kept``, the surviving block ids. Block b of a matrix is inner band b x outer
  band b (rows x columns for query/key/value/ffn_in, columns x rows for attn_out/ffn_out).

A sublayer whose matrices keep no block is dropped: its branch adds only a bias.

Example: hidden 4, G 2, ``inner_perm=[2, 0, 3, 1]``, ``outer_perm=[1, 2, 0, 3]``, kept
``[0]`` for ``query`` keeps rows {2, 0} x columns {1, 2} of the 4x4 query weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .arch import INNER_IS_ROWS, SUBLAYERS, Dims

RECIPE_VERSION = 1


@dataclass(frozen=True)
class MatrixPlan:
    """Outer-side permutation and kept block ids of one matrix."""

    outer_perm: tuple[int, ...]
    kept: tuple[int, ...]


@dataclass(frozen=True)
class SublayerPlan:
    """Grouping of one sublayer: shared inner order and per-matrix plans."""

    layer: int
    kind: str  # "attn" | "ffn"
    groups: int
    inner_perm: tuple[int, ...]
    matrices: dict[str, MatrixPlan]

    @property
    def dropped(self) -> bool:
        """True when no matrix of the sublayer keeps a block."""
        return all(not plan.kept for plan in self.matrices.values())

    def bands(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_perm, col_perm) of matrix ``role``: block b is band b of each."""
        inner = torch.tensor(self.inner_perm, dtype=torch.long)
        outer = torch.tensor(self.matrices[role].outer_perm, dtype=torch.long)
        return (inner, outer) if INNER_IS_ROWS[role] else (outer, inner)

    def mask(self, role: str) -> torch.Tensor:
        """The 0/1 mask of matrix ``role`` in original index order, shape (out, in)."""
        rows, cols = self.bands(role)
        g = self.groups
        rb, cb = len(rows) // g, len(cols) // g
        mask = torch.zeros(len(rows), len(cols))
        for b in self.matrices[role].kept:
            r, c = rows[b * rb:(b + 1) * rb], cols[b * cb:(b + 1) * cb]
            mask[r.unsqueeze(1), c.unsqueeze(0)] = 1.0
        return mask

    def kept_weights(self, dims: Dims) -> int:
        """Number of weights kept in this sublayer."""
        sizes = {"attn": dims.hidden * dims.hidden, "ffn": dims.hidden * dims.intermediate}
        block = sizes[self.kind] // (self.groups * self.groups)
        return block * sum(len(p.kept) for p in self.matrices.values())


@dataclass(frozen=True)
class Recipe:
    """The compression plan of a whole model; JSON round-trips exactly."""

    model_type: str
    dims: Dims
    sublayers: tuple[SublayerPlan, ...]
    meta: dict = field(default_factory=dict)

    def plan(self, layer: int, kind: str) -> SublayerPlan:
        for p in self.sublayers:
            if p.layer == layer and p.kind == kind:
                return p
        raise KeyError(f"recipe has no {kind} plan for layer {layer}")

    def sparsity(self) -> float:
        """Fraction of encoder linear weights removed."""
        d = self.dims
        total = d.layers * (4 * d.hidden * d.hidden + 2 * d.hidden * d.intermediate)
        return 1.0 - sum(p.kept_weights(d) for p in self.sublayers) / total

    def dropped_sublayers(self) -> list[str]:
        return [f"{p.layer}.{p.kind}" for p in self.sublayers if p.dropped]

    def flops_counts(self) -> tuple[int, list[int]]:
        """(encoder linear weights kept, attention-product width per layer): what
        ``pgb.flops.counted_flops`` needs. Grouping keeps every dimension, so a layer's
        attention is full width unless its sublayer is dropped."""
        d = self.dims
        dropped = {(p.layer, p.kind) for p in self.sublayers if p.dropped}
        widths = [0 if (i, "attn") in dropped else d.hidden for i in range(d.layers)]
        return sum(p.kept_weights(d) for p in self.sublayers), widths

    def to_json(self) -> dict:
        return {"version": RECIPE_VERSION, "model_type": self.model_type,
                "dims": asdict(self.dims), "meta": self.meta,
                "sublayers": [_plan_to_json(p) for p in self.sublayers]}

    @classmethod
    def from_json(cls, data: dict) -> Recipe:
        if data.get("version") != RECIPE_VERSION:
            raise ValueError(f"unsupported recipe version {data.get('version')!r}; "
                             f"this pgb reads version {RECIPE_VERSION}")
        dims = Dims(**data["dims"])
        plans = tuple(_plan_from_json(p) for p in data["sublayers"])
        recipe = cls(data["model_type"], dims, plans, data.get("meta", {}))
        recipe.validate()
        return recipe

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read recipe {path}: {err}; is this a pgb output "
                             "folder?") from err
        return cls.from_json(data)

    def validate(self) -> None:
        """Check shapes and permutations against ``dims``; ValueError naming the problem."""
        d = self.dims
        seen = {(p.layer, p.kind) for p in self.sublayers}
        want = {(layer, k) for layer in range(d.layers) for k in SUBLAYERS}
        if seen != want:
            raise ValueError(f"recipe covers sublayers {sorted(seen)}, expected {sorted(want)}")
        for p in self.sublayers:
            _validate_plan(p, d)
            perms = {m.outer_perm for m in p.matrices.values()}
            if self.meta.get("shared_order") and p.groups > 1 and len(perms) > 1:
                raise ValueError(f"layer {p.layer} {p.kind}: a shared_order recipe needs one "
                                 "outer_perm for all matrices of a sublayer; compress with "
                                 "shared_order=True (--shared-order) to produce one")


def _validate_plan(p: SublayerPlan, d: Dims) -> None:
    inner_n = d.hidden if p.kind == "attn" else d.intermediate
    where = f"layer {p.layer} {p.kind}"
    if p.groups < 1 or inner_n % p.groups or d.hidden % p.groups:
        raise ValueError(f"{where}: groups {p.groups} must divide {inner_n} and {d.hidden}")
    if sorted(p.inner_perm) != list(range(inner_n)):
        raise ValueError(f"{where}: inner_perm is not a permutation of {inner_n}")
    if set(p.matrices) != set(SUBLAYERS[p.kind]):
        raise ValueError(f"{where}: matrices {sorted(p.matrices)}, expected {SUBLAYERS[p.kind]}")
    for role, m in p.matrices.items():
        if sorted(m.outer_perm) != list(range(d.hidden)):
            raise ValueError(f"{where} {role}: outer_perm is not a permutation of {d.hidden}")
        if list(m.kept) != sorted(set(m.kept)) or any(not 0 <= b < p.groups for b in m.kept):
            raise ValueError(f"{where} {role}: kept {list(m.kept)} must be sorted distinct "
                             f"block ids in [0, {p.groups})")


def _plan_to_json(p: SublayerPlan) -> dict:
    return {"layer": p.layer, "kind": p.kind, "groups": p.groups,
            "inner_perm": list(p.inner_perm), "dropped": p.dropped,
            "matrices": {r: {"outer_perm": list(m.outer_perm), "kept": list(m.kept)}
                         for r, m in p.matrices.items()}}


def _plan_from_json(p: dict) -> SublayerPlan:
    mats = {r: MatrixPlan(tuple(m["outer_perm"]), tuple(m["kept"]))
            for r, m in p["matrices"].items()}
    return SublayerPlan(p["layer"], p["kind"], p["groups"], tuple(p["inner_perm"]), mats)
