"""Shared by the design experiments: a cached teacher (runs/teachers/<task>, from
benchmarks/teachers.sh) and its task data (training subset of 4,000 examples)."""

import json

from pgb.modeling import load_task_model
from pgb.taskdata import TaskData
from pgb.tasks import get_task


def teacher_and_data(task_name: str, max_samples: int | None = 4000):
    """(task, teacher in eval mode, tokenizer, data with the teacher's dev metrics);
    ``max_samples=None``: the whole training split."""
    task = get_task(task_name)
    teacher, tok, _ = load_task_model(f"runs/teachers/{task_name}", task)
    teacher.eval()
    data = TaskData(task, tok, "../shared/data", None, 128, max_samples=max_samples)
    with open(f"runs/teachers/{task_name}/metrics.json") as f:
        data.teacher_metrics = json.load(f)["metrics"]
    return task, teacher, tok, data
