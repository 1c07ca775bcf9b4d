"""Handlers of the tool commands: bench, export, report."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def cmd_bench(args) -> dict:
    """Latency, throughput and size of compressed models against their baselines."""
    import torch

    from .bench import NOISY_SPREAD, SETTINGS, bench_folders, summarize

    models = list(dict.fromkeys(args.model))  # a folder named twice is timed once
    names = ["compressed"] if len(models) == 1 else [f"compressed {i}" for i in range(len(models))]
    folders = dict(zip(names, models, strict=True))
    for name in ("baseline", "structured"):
        if getattr(args, name):
            folders[name] = getattr(args, name)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = bench_folders(folders, args.batch_size, args.seq_len, repeats=args.repeats,
                        warmup=args.warmup, threads=args.threads, device=device,
                        progress=not args.quiet, reuse_memory=args.reuse_memory,
                        compile_backend=args.compile)
    for name, r in res.items():
        shown = folders[name] if len(names) > 1 and name in names else name
        print(f"{shown:>11}: {r['latency_ms']:8.2f} ms  {r['throughput_seq_s']:8.1f} seq/s  "
              f"{r['params'] / 1e6:6.2f} M params  {r['checkpoint_bytes'] / 2**20:7.1f} MiB",
              file=sys.stderr)
        spread = r["latency_spread"]
        if spread is not None and spread > NOISY_SPREAD:
            log.warning("%s: latency varied by %.0f%% of its median across the %d timed runs "
                        "(10th to 90th percentile), so the speed-up carries that noise; rerun "
                        "with more --repeats or on a quieter machine, and compare several runs",
                        shown, 100 * spread, args.repeats)
    threads = args.threads or torch.get_num_threads()
    if len(models) == 1:
        summary = summarize(res, args.batch_size, args.seq_len, threads, device)
    else:  # one entry per model, as its own one-model bench would print it
        others = {k: res[k] for k in ("baseline", "structured") if k in res}
        summary = {**others, "models": {
            folders[name]: summarize({**others, "compressed": res[name]}, args.batch_size,
                                     args.seq_len, threads, device) for name in names}}
        entry = next(iter(summary["models"].values()))
        summary.update({k: entry[k] for k in SETTINGS})  # the run's, as in every entry
    summary["reuse_memory"] = args.reuse_memory
    summary["compile_backend"] = args.compile
    return summary


def cmd_export(args) -> dict:
    """Export to ONNX and check the outputs against PyTorch in onnxruntime."""
    from pathlib import Path

    from .bench import load_any
    from .export import export_onnx, verify_onnx

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model = load_any(args.model)
    export_onnx(model, out, opset=args.opset)
    diff = verify_onnx(model, out)
    log.info("exported %s -> %s (max abs difference vs PyTorch %.2e)", args.model, out, diff)
    return {"onnx": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff}


def cmd_report(args) -> dict:
    """report.md and a PNG picture of where a compressed model was cut."""
    from .report import write_report

    return write_report(args.folder)
