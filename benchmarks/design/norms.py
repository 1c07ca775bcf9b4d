"""Development experiment (see benchmarks/design/README.md): how far compensation moves
the kept weights. Per matrix: Frobenius norm of the student's (densified) weight over the
teacher's weight on the same mask, and the ratio of their spectral norms; then the
largest per-parameter gradient norms of the distillation loss on one MRPC batch.

Usage: python benchmarks/design/norms.py FOLDER
"""

import sys

import torch
from common import teacher_and_data

import pgb
from pgb.arch import MATRICES, get_matrix
from pgb.config import TrainConfig
from pgb.finetune import _step

task, teacher, tok, data = teacher_and_data("mrpc")
student = pgb.load(sys.argv[1])
dense = pgb.densify(student)
print("layer  matrix:|W_student|/|W_teacher on the mask| (Frobenius)/spectral-norm ratio")
for layer in range(6):
    row = []
    for role in MATRICES:
        wt = get_matrix(teacher, layer, role).weight.detach()
        ws = get_matrix(dense, layer, role).weight.detach()
        frob = ws.norm() / (wt * (ws != 0)).norm()
        spec = torch.linalg.matrix_norm(ws, 2) / torch.linalg.matrix_norm(wt, 2)
        row.append(f"{role}:{float(frob):.2f}/{float(spec):.2f}")
    print(layer, " ".join(row))
batch = data.epoch_batches(32, 0)(0)[3]
for m in student.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
student.train()
_step(student, teacher, batch, TrainConfig(), "cpu")
grads = sorted(((float(p.grad.norm()), n) for n, p in student.named_parameters()
                if p.grad is not None), reverse=True)
print([(round(g, 2), n) for g, n in grads[:12]])
