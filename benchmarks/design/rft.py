"""Development experiment (see benchmarks/design/README.md): compression with
re-finetuning under several configurations, each a JSON of CompressConfig fields.

Usage: python benchmarks/design/rft.py TASK SPARSITY '{"kd_hidden": 0.0}' ['{...}' ...]
"""

import json
import sys

from pgb.config import CompressConfig
from pgb.modeling import load_task_model
from pgb.pipeline import compress
from pgb.taskdata import TaskData
from pgb.tasks import get_task

task, sparsity = get_task(sys.argv[1]), float(sys.argv[2])
teacher, tok, _ = load_task_model(f"runs/teachers/{sys.argv[1]}", task)
teacher.eval()
data = TaskData(task, tok, "../shared/data", None, 128)
for spec in sys.argv[3:]:
    cfg = CompressConfig(sparsity=sparsity, **json.loads(spec))
    rep = compress(teacher, tok, task, cfg, data, progress=False).report
    seconds = {k: round(v) for k, v in rep["stage_seconds"].items()}
    print(spec, "groups", rep["groups"], "dropped", rep["dropped_sublayers"], "metrics",
          rep["metrics"], "teacher", rep["teacher_metrics"], "sec", seconds, flush=True)
