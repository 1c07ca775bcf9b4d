"""Development experiment (see benchmarks/design/README.md): can the one-shot compact
student fit a single batch? 30 Adam steps (lr from argv, default 1e-4, no dropout, no
weight decay) on one training batch of 32 of TASK (default MRPC), distilling from the
teacher; prints the loss and the global gradient norm every 5 steps.

Usage: python benchmarks/design/overfit.py FOLDER[,FOLDER...] [LR] [TASK]
"""

import sys

import torch
from common import teacher_and_data

import pgb
from pgb.config import TrainConfig
from pgb.finetune import _optimizer, _step

task, teacher, tok, data = teacher_and_data(sys.argv[3] if len(sys.argv) > 3 else "mrpc")
batch = data.epoch_batches(32, 0)(0)[3]
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-4
for folder in sys.argv[1].split(","):
    torch.manual_seed(0)
    student = pgb.load(folder)
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = TrainConfig(lr=lr, weight_decay=0.0)
    opt = _optimizer(student, cfg)
    student.train()
    out = []
    for i in range(30):
        loss = _step(student, teacher, batch, cfg, "cpu")
        norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1e9))  # no clipping
        opt.step()
        opt.zero_grad()
        if i % 5 == 0 or i == 29:
            out.append((i, round(loss, 4), round(norm, 1)))
    print(folder, lr, out, flush=True)
