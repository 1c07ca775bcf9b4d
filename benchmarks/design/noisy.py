"""Shared by the design experiments: compensation with the student's hidden dropout on
(its calibration activations carry dropout noise; the teacher's targets do not)."""

import torch
import torch.nn.functional as F

import pgb.pipeline

plain_compensate = pgb.pipeline.compensate


class _AlwaysDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, training=True)


def noisy_compensate(student, *args, **kwargs):
    swapped = []
    for module in list(student.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(module, child_name, _AlwaysDropout(child.p))
                swapped.append((module, child_name, child))
    torch.manual_seed(0)
    try:
        plain_compensate(student, *args, **kwargs)
    finally:
        for module, child_name, child in swapped:
            setattr(module, child_name, child)


def use(noisy: bool) -> None:
    """Make pgb.pipeline.compress compensate with (True) or without (False) the noise."""
    pgb.pipeline.compensate = noisy_compensate if noisy else plain_compensate
