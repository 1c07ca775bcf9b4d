"""Development experiment (see benchmarks/design/README.md): how brittle is a one-shot
student? For each configuration (a JSON of CompressConfig fields): the dev metric, and
the re-finetuning loss on the first 8 training batches in eval mode and in train mode
(dropout on). A large gap means dropout, and so re-finetuning, starts far from the
one-shot solution.

Usage: python benchmarks/design/brittle.py TASK SPARSITY '{"damping": 0.1}' ['{...}' ...]
Extra key: "noisy_compensation": true runs the student's hidden dropout during
compensation (its calibration activations carry dropout noise; the teacher's targets do
not).
"""

import json
import sys

import noisy
import torch
from common import teacher_and_data

from pgb.config import CompressConfig
from pgb.finetune import _step, set_seed
from pgb.pipeline import run_method

task, teacher, tok, data = teacher_and_data(sys.argv[1])
sparsity = float(sys.argv[2])
for spec in sys.argv[3:]:
    fields = json.loads(spec)
    noisy.use(fields.pop("noisy_compensation", False))
    cfg = CompressConfig(sparsity=sparsity, refinetune=False, **fields)
    result = run_method(teacher, tok, task, cfg, data, progress=False)
    student, tcfg = result.model, CompressConfig(sparsity=sparsity).train_config()
    batches = data.epoch_batches(tcfg.batch_size, tcfg.seed)(0)[:8]
    loss = {}
    for mode in ("eval", "train"):
        set_seed(0)
        student.train(mode == "train")
        with torch.no_grad():
            loss[mode] = round(sum(_step(student, teacher, b, tcfg, "cpu", backward=False)
                                   for b in batches) / len(batches), 4)
    print(spec, "metrics", result.report["metrics"], "start loss", loss, flush=True)
