"""Development experiment (see benchmarks/design/README.md): does re-finetuning recover a
PGB student when the pruned weights fade out during it instead of being cut before it?

The grouping and allocation are PGB's own (one shot, from the teacher's Fisher scores).
The student starts as the dense teacher; during the first ``fade`` fraction of the
re-finetuning steps every weight outside the kept blocks is multiplied by a factor that
goes linearly from 1 to 0, then stays 0 (the kept weights train throughout). The result
is the recipe's masked model, turned compact by the library's surgery and evaluated.

Usage: python benchmarks/design/anneal.py TASK SPARSITY '{"fade": 0.5}' ['{...}' ...]
Extra keys besides CompressConfig fields: "fade" (fraction of steps, 0 = cut at once),
"compensate_after" (run the library's compensation on the masked student when the fade
ends, before the remaining steps; default false).
"""

import copy
import json
import sys
import time

import torch
from common import teacher_and_data
from torch import nn
from torch.nn.utils import parametrize

from pgb.arch import get_matrix
from pgb.config import CompressConfig
from pgb.finetune import train
from pgb.pipeline import _allocate, _scores, dev_metrics, search_groupings
from pgb.surgery import to_compact

task, teacher, tok, data = teacher_and_data(sys.argv[1])
sparsity = float(sys.argv[2])


class Fade(nn.Module):
    """``w * (mask + (1 - mask) * alpha)`` with alpha in a shared one-element tensor."""

    def __init__(self, mask, alpha):
        super().__init__()
        self.register_buffer("mask", mask)
        self.alpha = alpha

    def forward(self, w):
        return w * (self.mask + (1 - self.mask) * self.alpha)


CACHE: dict = {}
for spec in sys.argv[3:]:
    fields = json.loads(spec)
    fade = fields.pop("fade", 0.5)
    cfg = CompressConfig(sparsity=sparsity, **fields)
    calib = data.calibration(cfg.calib_samples, cfg.calib_batch_size, cfg.seed)
    if "groupings" not in CACHE:
        CACHE["groupings"] = search_groupings(_scores(teacher, calib, cfg, False), teacher,
                                              cfg, False)
    recipe = _allocate(CACHE["groupings"], teacher, cfg, sparsity)
    student = copy.deepcopy(teacher)
    alpha = torch.ones(())
    linears = []
    for plan in recipe.sublayers:
        for role in plan.matrices:
            lin = get_matrix(student, plan.layer, role)
            parametrize.register_parametrization(lin, "weight", Fade(plan.mask(role).float(),
                                                                     alpha))
            linears.append(lin)
    tcfg = cfg.train_config()
    steps = len(data.epoch_batches(tcfg.batch_size, tcfg.seed)(0))
    fade_steps = max(1, round(fade * steps)) if fade > 0 else 0
    count = {"n": 0}

    def tick(module, args, kwargs, alpha=alpha, count=count, fade_steps=fade_steps):
        if module.training:
            alpha.fill_(max(0.0, 1.0 - count["n"] / fade_steps) if fade_steps else 0.0)
            count["n"] += 1

    hook = student.register_forward_pre_hook(tick, with_kwargs=True)
    start = time.perf_counter()
    info = train(student, data.epoch_batches(tcfg.batch_size, tcfg.seed), tcfg,
                 teacher=teacher if cfg.distill else None, progress=False)
    hook.remove()
    alpha.fill_(0.0)
    for lin in linears:
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    to_compact(student, recipe)
    after = dev_metrics(student, task, tok, data, progress=False)
    print(spec, "groups", {f"{p.layer}.{p.kind}": p.groups for p in recipe.sublayers},
          "steps", info.get("steps"), "after", after, "sec", round(time.perf_counter() - start),
          flush=True)
