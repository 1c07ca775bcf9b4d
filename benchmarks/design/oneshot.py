"""Development experiment (see benchmarks/design/README.md): one-shot compression (no
re-finetuning) of a teacher under several configurations, each a JSON of CompressConfig
fields.

Usage: python benchmarks/design/oneshot.py TASK '{"sparsity": 0.5}' ['{...}' ...]
TASK:full (e.g. ``stsb:full``) draws from the whole training split instead of the seeded
4,000-example subset (for calibration samples larger than 4,000).
"""

import json
import sys

from common import teacher_and_data

from pgb.config import CompressConfig
from pgb.pipeline import run_method

name, _, scope = sys.argv[1].partition(":")
task, teacher, tok, data = teacher_and_data(name, None if scope == "full" else 4000)
for spec in sys.argv[2:]:
    cfg = CompressConfig(refinetune=False, **json.loads(spec))
    rep = run_method(teacher, tok, task, cfg, data, progress=False).report
    seconds = {k: round(v) for k, v in rep["stage_seconds"].items()}
    print(spec, "metrics", rep["metrics"], "drop", rep["dropped_sublayers"], "sec", seconds,
          flush=True)
