"""Parsers of the tool commands: bench, export, report (handlers in ``pgb.tools``)."""

from __future__ import annotations

import argparse


def add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency/throughput/size: compressed vs baseline")
    p.add_argument("--model", required=True, action="append",
                   help="compressed model folder; repeat it to time several models in the "
                        "same interleaved rounds (the last line then holds them all under "
                        "\"models\", each with its speed-up over --baseline)")
    p.add_argument("--baseline", help="dense teacher folder to compare against")
    p.add_argument("--structured", help="a head/neuron-pruned folder to measure as well")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per forward (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed runs per model first (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--reuse-memory", action="store_true",
                   help="keep freed memory in the process (glibc mallopt) so forwards do not "
                        "page-fault fresh memory in; applies to every model measured")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time every model through torch.compile (backend: inductor unless "
                        "named; the first warm-up pass compiles, tens of seconds a model)")
    p = sub.add_parser("export", help="export a model to ONNX")
    p.add_argument("--model", required=True, help="model folder (teacher or pgb output)")
    p.add_argument("--out", required=True, help="FILE.onnx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset version (default: %(default)s)")
    p = sub.add_parser("report", help="report.md and a picture of where the model was cut")
    p.add_argument("folder", help="a pgb compress output folder")
