"""Development experiment (see benchmarks/design/README.md): one-shot compression (no
re-finetuning) of a teacher under several configurations, each a JSON of CompressConfig
fields.

Usage: python benchmarks/design/oneshot.py TASK '{"sparsity": 0.5}' ['{...}' ...]
"""

import json
import sys

from pgb.config import CompressConfig
from pgb.modeling import load_task_model
from pgb.pipeline import run_method
from pgb.taskdata import TaskData
from pgb.tasks import get_task

task = get_task(sys.argv[1])
teacher, tok, _ = load_task_model(f"runs/teachers/{sys.argv[1]}", task)
teacher.eval()
data = TaskData(task, tok, "../shared/data", None, 128, max_samples=4000)
with open(f"runs/teachers/{sys.argv[1]}/metrics.json") as f:
    data.teacher_metrics = json.load(f)["metrics"]
for spec in sys.argv[2:]:
    cfg = CompressConfig(refinetune=False, **json.loads(spec))
    rep = run_method(teacher, tok, task, cfg, data, progress=False).report
    seconds = {k: round(v) for k, v in rep["stage_seconds"].items()}
    print(spec, "metrics", rep["metrics"], "drop", rep["dropped_sublayers"], "sec", seconds,
          flush=True)
