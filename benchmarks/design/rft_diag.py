"""Development experiment (see benchmarks/design/README.md): why does re-finetuning move
PGB students so little? Compresses one shot, then re-finetunes with the library's own
step and update functions while logging, every LOG steps, the training loss, the global
gradient norm before clipping, and the share of it on the grouped (compact) weights.

Usage: python benchmarks/design/rft_diag.py TASK SPARSITY '{"method": "pgb"}' ['{...}' ...]
Extra keys besides CompressConfig fields: "steps" (default: one epoch), "dropout" (the
student's dropout probability during re-finetuning; default: the model's own),
"noisy_compensation" (see noisy.py), "grouped_lr_scale" (the grouped weights' learning rate
as a multiple of the others'; 0 freezes them), "augment" (each step also distils, KD only, on
a copy of the batch with this fraction of its real tokens replaced by [MASK]: matching the
teacher around the training inputs, not only on them), "kd_alpha" and "kd_temperature"
(the re-finetuning's distillation weight and temperature; the library uses 0.9 and 2.0).
"""

import copy
import dataclasses
import json
import math
import sys
import time

import noisy
import torch
from common import teacher_and_data

from pgb.config import CompressConfig
from pgb.finetune import _optimizer, _schedule, _step, kd_loss, set_seed, total_steps
from pgb.grouped_linear import GroupedLinear
from pgb.pipeline import dev_metrics, run_method

LOG = 10
ONE_SHOT: dict = {}
task, teacher, tok, data = teacher_and_data(sys.argv[1])
sparsity = float(sys.argv[2])


def grad_norms(model):
    grouped, other = 0.0, 0.0
    grouped_ids = {id(p) for m in model.modules() if isinstance(m, GroupedLinear)
                   for p in m.parameters()}
    for p in model.parameters():
        if p.grad is not None:
            sq = float(p.grad.pow(2).sum())
            if id(p) in grouped_ids:
                grouped += sq
            else:
                other += sq
    return math.sqrt(grouped + other), math.sqrt(grouped)


def scaled_optimizer(model, opt, lr, scale):
    """The same AdamW groups with the grouped weights at lr * scale (frozen when 0)."""
    grouped = {id(m.weight) for m in model.modules() if isinstance(m, GroupedLinear)}
    groups = []
    for g in opt.param_groups:
        mine = [p for p in g["params"] if id(p) in grouped]
        groups.append({"params": [p for p in g["params"] if id(p) not in grouped],
                       "weight_decay": g["weight_decay"]})
        if scale == 0:
            for p in mine:
                p.requires_grad_(False)
        elif mine:
            groups.append({"params": mine, "weight_decay": g["weight_decay"], "lr": lr * scale})
    return torch.optim.AdamW(groups, lr=lr)


def masked_copy(batch, fraction, generator):
    """The batch's inputs (no labels) with ``fraction`` of the real, non-special tokens
    replaced by the tokenizer's mask token."""
    inputs = {k: v for k, v in batch.items() if not k.endswith(("labels", "positions"))}
    ids = inputs["input_ids"]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in tok.all_special_ids:
        special |= ids == t
    real = inputs["attention_mask"].bool() & ~special
    pick = real & (torch.rand(ids.shape, generator=generator) < fraction)
    return {**inputs, "input_ids": ids.masked_fill(pick, tok.mask_token_id)}


def augmented_step(student, batch, tcfg, fraction, generator):
    """The library's step, then a KD-only step on a masked copy of the batch."""
    loss = _step(student, teacher, batch, tcfg, "cpu")
    corrupted = masked_copy(batch, fraction, generator)
    with torch.no_grad():
        t_out = teacher(**corrupted)
    (tcfg.kd_alpha * kd_loss(student(**corrupted), t_out, tcfg.kd_temperature)).backward()
    return loss


for spec in sys.argv[3:]:
    fields = json.loads(spec)
    steps_wanted = fields.pop("steps", None)
    dropout = fields.pop("dropout", None)
    noisy.use(fields.pop("noisy_compensation", False))
    grouped_scale = fields.pop("grouped_lr_scale", None)
    augment = fields.pop("augment", 0.0)
    kd = {k: fields.pop(k) for k in ("kd_alpha", "kd_temperature") if k in fields}
    gen = torch.Generator().manual_seed(0)
    cfg = CompressConfig(sparsity=sparsity, refinetune=False, **fields)
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in ONE_SHOT:  # the one-shot student is shared by specs that differ in training
        result = run_method(teacher, tok, task, cfg, data, progress=False)
        ONE_SHOT[key] = (result.model, result.report["metrics"])
    student, before = copy.deepcopy(ONE_SHOT[key][0]), ONE_SHOT[key][1]
    tcfg = dataclasses.replace(CompressConfig(sparsity=sparsity, **fields).train_config(), **kd)
    set_seed(tcfg.seed)
    batches = data.epoch_batches(tcfg.batch_size, tcfg.seed)(0)
    steps = steps_wanted or total_steps(tcfg, len(batches))
    opt = _optimizer(student, tcfg)
    if grouped_scale is not None:
        opt = scaled_optimizer(student, opt, tcfg.lr, grouped_scale)
    sched = _schedule(opt, steps, int(tcfg.warmup_ratio * steps))
    if dropout is not None:
        for m in student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
    for mode in ("eval", "train"):  # the starting loss, without and with dropout
        student.train(mode == "train")
        with torch.no_grad():
            start_loss = [_step(student, teacher, b, tcfg, "cpu", backward=False)
                          for b in batches[:8]]
        print(f"  start loss ({mode} mode) {sum(start_loss) / len(start_loss):.4f}", flush=True)
    student.train()
    start, losses = time.perf_counter(), []
    for i in range(steps):
        batch = batches[i % len(batches)]
        losses.append(augmented_step(student, batch, tcfg, augment, gen) if augment
                      else _step(student, teacher, batch, tcfg, "cpu"))
        total, grouped = grad_norms(student)
        torch.nn.utils.clip_grad_norm_(student.parameters(), tcfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i % LOG == 0 or i == steps - 1:
            print(f"  step {i:4d} loss {sum(losses[-LOG:]) / len(losses[-LOG:]):.4f} "
                  f"grad {total:.3g} (grouped {grouped:.3g}) lr {sched.get_last_lr()[0]:.2e}",
                  flush=True)
    student.eval()
    after = dev_metrics(student, task, tok, data, progress=False)
    print(spec, "before", before, "after", after, "sec", round(time.perf_counter() - start),
          flush=True)
