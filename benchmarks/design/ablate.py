"""Development experiment (see benchmarks/design/README.md): importance scaling and
grouping ablations, one shot, masked and compensated.

Usage: python benchmarks/design/ablate.py TASK SPARSITY [CALIB_SAMPLES]
"""

import copy
import sys

from pgb.allocation import allocate
from pgb.arch import dims_of
from pgb.compensate import apply_masks, compensate
from pgb.config import CompressConfig
from pgb.evaluation import evaluate
from pgb.importance import importance_scores
from pgb.modeling import load_task_model
from pgb.pipeline import search_groupings
from pgb.taskdata import TaskData
from pgb.tasks import get_task

task, sparsity = get_task(sys.argv[1]), float(sys.argv[2])
teacher, tok, _ = load_task_model(f"runs/teachers/{sys.argv[1]}", task)
teacher.eval()
data = TaskData(task, tok, "../shared/data", None, 128, max_samples=4000)
calib = data.calibration(int(sys.argv[3]) if len(sys.argv) > 3 else 512, 32, 0)
raw = importance_scores(teacher, calib, progress=False)
variants = [("raw", CompressConfig(sparsity=sparsity, normalize="none")),
            ("mean", CompressConfig(sparsity=sparsity)),
            ("mean-noperm", CompressConfig(sparsity=sparsity, permute=False)),
            ("uniform", CompressConfig(sparsity=sparsity, uniform_groups=True))]
for name, cfg in variants:
    scores = raw if cfg.normalize == "none" else {n: s / s.mean() for n, s in raw.items()}
    groupings = search_groupings(scores, teacher, cfg, progress=False)
    recipe = allocate(groupings, dims_of(teacher), "bert", sparsity,
                      uniform=cfg.uniform_g() if cfg.uniform_groups else None,
                      allow_drop=not cfg.uniform_groups)
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)
    masked = evaluate(student, task, tok, "../shared/data", progress=False)
    compensate(student, teacher, recipe, calib, progress=False)
    comp = evaluate(student, task, tok, "../shared/data", progress=False)
    groups = {p.layer * 10 + (p.kind == "ffn"): p.groups for p in recipe.sublayers}
    print(name, groups, recipe.dropped_sublayers(), "masked", masked, "comp", comp, flush=True)
