"""Would a fused grouped FFN pay? A/B of the compact model as built against the same model
with its FFN intermediate kept block-major.

In the compact model, ffn_in writes the (tokens, 1536) intermediate in token-major order
(oneDNN's grouped convolution above a few hundred tokens), GELU runs on it and ffn_out
reads it back. The variant keeps the intermediate as (G, tokens, 1536 / G): ffn_in is one
``baddbmm`` (bias fused), GELU runs on that, and ffn_out is one ``bmm`` written straight
into its output bands; no transposing pass and no convolution. A quick exploration on the
grouped layers alone at 4,096 tokens made it look worth trying; this script measures the
whole model.
Only layers whose FFN keeps every block of both matrices with the shared inner order are
patched (the others run as built); the logits of both are compared first.

Usage: python benchmarks/fused_ffn_ab.py --out benchmarks/results/fused_ffn_ab.json \
    [--batch-size 32] [--rounds 5] MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from speed import cpu_model

import pgb
from pgb.arch import layer_module
from pgb.grouped_linear import GroupedLinear


def fuse_ffn(model) -> int:
    """Patch every BERT-style layer whose ffn_in / ffn_out can keep the intermediate
    block-major; return how many were patched (inference only, no autograd)."""
    patched = 0
    for i in range(model.config.num_hidden_layers):
        layer = layer_module(model, i)
        inter, fo = layer.intermediate, layer.output.dense
        fi = inter.dense
        if not (isinstance(fi, GroupedLinear) and isinstance(fo, GroupedLinear)
                and fi._all_kept and fo._all_kept and fi.groups == fo.groups
                and fi.out_index is None and fo.in_index is None):
            continue
        shape: dict = {}

        def inter_forward(h, fi=fi, shape=shape):
            shape["lead"] = h.shape[:-1]
            x = h.reshape(-1, h.shape[-1])
            xb = x if fi.in_index is None else x.index_select(1, fi.in_index)
            g, n = fi.groups, xb.shape[0]
            hb = torch.baddbmm(fi.bias.view(g, 1, fi.ob), xb.view(n, g, fi.ib).transpose(0, 1),
                               fi.weight)
            return F.gelu(hb)  # (G, N, ob): block-major

        def out_forward(hb, fo=fo, shape=shape):
            g, n, _ = hb.shape
            y = hb.new_empty(n, fo.out_features)
            torch.bmm(hb, fo.weight, out=y.view(n, g, fo.ob).transpose(0, 1))
            y.add_(fo.bias)
            if fo._out_gather is not None:
                y = y.index_select(1, fo._out_gather)
            return y.view(*shape["lead"], fo.out_features)

        inter.forward, fo.forward = inter_forward, out_forward
        patched += 1
    return patched


def latency_ms(model, inputs: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch_size, args.seq_len)
    inputs = {"input_ids": torch.randint(1000, 2000, shape),
              "attention_mask": torch.ones(shape, dtype=torch.long),
              "token_type_ids": torch.zeros(shape, dtype=torch.long)}
    runs = 5 if args.batch_size > 1 else 50
    rows = []
    for folder in args.models:
        built, fused = pgb.load(folder).eval(), pgb.load(folder).eval()
        patched = fuse_ffn(fused)
        with torch.inference_mode():
            diff = (built(**inputs).logits - fused(**inputs).logits).abs().max().item()
            for m in (built, fused):
                latency_ms(m, inputs, 2)
            built_ms, fused_ms = [], []
            for _ in range(args.rounds):  # interleaved
                built_ms.append(latency_ms(built, inputs, runs))
                fused_ms.append(latency_ms(fused, inputs, runs))
        ratios = [b / f for b, f in zip(built_ms, fused_ms, strict=True)]
        rows.append({"model": folder, "patched_layers": patched, "max_abs_logit_diff": diff,
                     "built_ms": built_ms, "fused_ms": fused_ms,
                     "speedup_median": statistics.median(ratios)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
            "runs_per_round": runs}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Fused grouped FFN (block-major intermediate) vs the compact model as built "
             "(generated by `benchmarks/fused_ffn_ab.py`)", "",
             f"{meta['cpu']}, {args.threads} threads, batch {args.batch_size} x "
             f"{args.seq_len}, {args.rounds} interleaved rounds of {runs} forwards (median "
             "per round); speed-up = built / fused, median over rounds.", "",
             "| model | FFN layers patched | max logit diff | built ms | fused ms | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['patched_layers']} | {r['max_abs_logit_diff']:.1e} "
                     f"| {statistics.median(r['built_ms']):.1f} "
                     f"| {statistics.median(r['fused_ms']):.1f} | {r['speedup_median']:.3f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
