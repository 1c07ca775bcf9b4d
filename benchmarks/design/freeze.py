"""Development experiment (see benchmarks/design/README.md): re-finetune a one-shot
compact MRPC student for one epoch (the default re-finetuning config) with the parameters
whose names contain any of the comma-separated keys frozen ("" freezes nothing).

Usage: python benchmarks/design/freeze.py FOLDER SPEC [SPEC ...]
"""

import json
import sys
import time

from common import teacher_and_data

import pgb
from pgb.config import CompressConfig
from pgb.finetune import train
from pgb.pipeline import dev_metrics

task, teacher, tok, data = teacher_and_data("mrpc")
for spec in sys.argv[2:]:
    student = pgb.load(sys.argv[1])
    frozen = 0
    for name, p in student.named_parameters():
        if any(key in name for key in spec.split(",") if key):
            p.requires_grad_(False)
            frozen += p.numel()
    tcfg = CompressConfig(sparsity=0.5).train_config()
    start = time.perf_counter()
    info = train(student, data.epoch_batches(tcfg.batch_size, tcfg.seed), tcfg,
                 teacher=teacher, progress=False)
    print(json.dumps({"freeze": spec, "frozen": frozen, "final_loss": info["final_loss"],
                      "metrics": dev_metrics(student, task, tok, data, progress=False),
                      "sec": round(time.perf_counter() - start)}), flush=True)
