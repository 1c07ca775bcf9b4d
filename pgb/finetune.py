"""A small, readable training loop: AdamW, linear warm-up and decay, optional distillation.

Used to fine-tune the task teacher and to re-finetune the compressed student (structure
frozen: only the kept blocks, biases, LayerNorms, embeddings and head train). With a
teacher, the loss is ``kd_alpha * KD + (1 - kd_alpha) * task``; KD is the KL divergence of
temperature-softened logits (times T^2) for classification and QA, and the squared error to
the teacher's prediction for regression, plus ``kd_hidden`` times the mean squared error
between student and teacher layer outputs (hidden-state distillation). Each batch runs as
length-sorted pieces (:mod:`pgb.pieces`): the same loss and gradient, less padding. On the
CPU dropout draws its masks from pgb's native library (:mod:`pgb.dropout`).

Under ``torch.distributed`` the model is wrapped in DDP and rank r takes batches
r, r + world, ... of the same seeded order; resumable checkpoints hold model, optimizer,
scheduler, RNG and position, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from .config import TrainConfig
from .dropout import fast_dropout
from .pieces import each_piece
from .surgery import hidden_state_orders
from .teacher_cache import TeacherOutputs

log = logging.getLogger(__name__)
# Milestones of long loops: they reach log.txt in the output folder (for runs in the
# background), not stderr, where the progress bar already shows them (pgb.cli).
progress_log = logging.getLogger("pgb.progress")


def set_seed(seed: int) -> None:
    """Seed Python-side torch RNGs (CPU and CUDA)."""
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    return dist.rank(), dist.world()


def kd_loss(student_out, teacher_out, temperature: float) -> torch.Tensor:
    """Distillation loss between two model outputs (classification, regression or QA)."""
    if hasattr(student_out, "start_logits"):
        return 0.5 * (_kl(student_out.start_logits, teacher_out.start_logits, temperature)
                      + _kl(student_out.end_logits, teacher_out.end_logits, temperature))
    s, t = student_out.logits, teacher_out.logits
    if s.shape[-1] == 1:  # regression
        return F.mse_loss(s, t)
    return _kl(s, t, temperature)


def _kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1),
                    log_target=True, reduction="batchmean") * temp * temp


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _schedule(opt, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))


def train(model: nn.Module, make_batches: Callable[[int], list], cfg: TrainConfig,
          teacher: nn.Module | TeacherOutputs | None = None, progress: bool = True,
          checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train ``model`` in place; returns a summary (steps, final loss, seconds).

    make_batches(epoch) returns that epoch's batches in a seeded order (the same list on
    every rank). ``teacher`` may be a :class:`TeacherOutputs` (outputs reused across runs).
    checkpoint_dir with ``cfg.checkpoint_every > 0`` saves resumable state;
    ``resume=True`` continues from the last one there.
    """
    rank, world = distributed()
    device = next(model.parameters()).device
    set_seed(cfg.seed)
    epoch_batches = make_batches(0)
    per_epoch = max(1, len(epoch_batches) // world)
    steps = total_steps(cfg, per_epoch)
    runner = _wrap(model)
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, steps, int(cfg.warmup_ratio * steps))
    state = {"step": 0, "loss": float("nan")}
    run = _run_signature(cfg, steps, per_epoch, world)
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the interrupted run")
        state = _load_checkpoint(checkpoint_dir, model, opt, sched, run) or state
    elif checkpoint_dir and (Path(checkpoint_dir) / CHECKPOINT).exists():
        log.warning("%s holds a checkpoint of an interrupted run; starting over (it will be "
                    "overwritten). Pass --resume to continue it instead",
                    Path(checkpoint_dir) / CHECKPOINT)
    if teacher is not None:
        _module(teacher).eval()
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=state["step"], desc="training", disable=not progress or rank)
    milestones = Milestones(steps, state["step"])
    with fast_dropout(model):  # native dropout masks on CPU (pgb.dropout)
        while state["step"] < steps:
            epoch, offset = divmod(state["step"], per_epoch)
            batches = epoch_batches if epoch == 0 else make_batches(epoch)
            for i in range(offset, per_epoch):
                if state["step"] >= steps:
                    break
                loss = _step(runner, teacher, batches[i * world + rank], cfg, device)
                _update(model, opt, sched, cfg)
                state = {"step": state["step"] + 1, "loss": loss}
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if not rank:
                    milestones.update(state["step"], loss)
                if cfg.checkpoint_every and checkpoint_dir and \
                        state["step"] % cfg.checkpoint_every == 0 and rank == 0:
                    _save_checkpoint(checkpoint_dir, model, opt, sched, state, run)
    bar.close()
    model.eval()
    return {"steps": state["step"], "final_loss": state["loss"],
            "seconds": time.perf_counter() - start}


class Milestones:
    """Logs training at every tenth of the steps: mean loss since the last line, time left."""

    def __init__(self, steps: int, start: int = 0, parts: int = 10) -> None:
        self.steps, self.start, self.parts = steps, start, parts
        self.t0 = time.perf_counter()
        self.losses: list[float] = []

    def update(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if step * self.parts // self.steps == (step - 1) * self.parts // self.steps:
            return  # still inside the same tenth
        elapsed = time.perf_counter() - self.t0
        left = elapsed / (step - self.start) * (self.steps - step)
        progress_log.info("training step %d/%d (%.0f%%): loss %.4f (mean of the last %d), "
                          "%.1f min elapsed, about %.1f min left", step, self.steps,
                          100 * step / self.steps, sum(self.losses) / len(self.losses),
                          len(self.losses), elapsed / 60, left / 60)
        self.losses = []


def _wrap(model: nn.Module) -> nn.Module:
    if distributed()[1] > 1:
        # An empty parameter (a compact matrix that keeps no block, shape (0, r, c)) never
        # gets a gradient, and DDP would wait for it forever: it has nothing to learn.
        for p in model.parameters():
            if p.numel() == 0:
                p.requires_grad_(False)
        return nn.parallel.DistributedDataParallel(model)
    return model


def _step(runner, teacher, batch, cfg: TrainConfig, device, backward: bool = True) -> float:
    """One batch's loss, and its gradient when ``backward``; the batch runs as length-sorted
    pieces (:mod:`pgb.pieces`), each piece's loss weighted by its share of the examples (of
    the real tokens, for hidden-state distillation), so the sum is the batch's loss."""
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = teacher is not None and cfg.kd_alpha > 0 and cfg.kd_hidden > 0
    mask = batch.get("attention_mask")
    tokens = mask.sum() if mask is not None else None
    total = 0.0
    for piece, share, last in each_piece(batch):
        no_sync = getattr(runner, "no_sync", None)  # DDP: all-reduce once, after the last
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            out = runner(**piece, output_hidden_states=hidden)
            loss = out.loss * share
            if teacher is not None and cfg.kd_alpha > 0:
                if isinstance(teacher, TeacherOutputs) and not hidden:  # kept per piece
                    t_out = teacher(_inputs(piece))
                else:
                    with torch.no_grad():
                        t_out = _module(teacher)(**_inputs(piece), output_hidden_states=hidden)
                kd = kd_loss(out, t_out, cfg.kd_temperature) * share
                if hidden:
                    t_hidden = _in_student_order(getattr(runner, "module", runner),
                                                 t_out.hidden_states)
                    piece_mask = piece.get("attention_mask")
                    weight = piece_mask.sum() / tokens if tokens is not None else share
                    kd = kd + cfg.kd_hidden * weight * hidden_loss(out.hidden_states, t_hidden,
                                                                   piece_mask)
                loss = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the "
                                         f"learning rate (now {cfg.lr}) or check the labels")
            if backward:
                loss.backward()
        total += float(loss.detach())
    return total


def _inputs(batch: dict) -> dict:
    """The model inputs of a batch: labels and answer positions left out."""
    return {k: v for k, v in batch.items() if not k.endswith(("labels", "positions"))}


def _module(teacher: nn.Module | TeacherOutputs) -> nn.Module:
    return teacher.teacher if isinstance(teacher, TeacherOutputs) else teacher


def _in_student_order(student: nn.Module, teacher_hidden: tuple) -> tuple:
    """The teacher's hidden states in the order the student's stream runs in (a compact
    shared-order model keeps it permuted between layers)."""
    if getattr(student, "pgb_recipe", None) is None:
        return teacher_hidden
    orders = hidden_state_orders(student)
    return tuple(t if o is None else t.index_select(-1, o.to(t.device))
                 for t, o in zip(teacher_hidden, orders, strict=True))


def hidden_loss(student: tuple, teacher: tuple, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error between the layers' outputs, over real tokens, averaged over layers.

    Hidden sizes are kept by every pgb method, so each student layer is matched to the
    teacher layer of the same index (the embedding output included).
    """
    losses = []
    for s, t in zip(student, teacher, strict=True):
        err = (s - t).pow(2).mean(-1)  # (B, T)
        losses.append(err[mask.bool()].mean() if mask is not None else err.mean())
    return torch.stack(losses).mean()


def _update(model, opt, sched, cfg: TrainConfig) -> None:
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


CHECKPOINT = "train_state.pt"


def _run_signature(cfg: TrainConfig, steps: int, per_epoch: int, world: int) -> dict:
    """What a checkpoint must share with the run that resumes it (checkpoint_every may change)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}
    return {"steps": steps, "per_epoch": per_epoch, "world": world, "config": settings}


def _save_checkpoint(folder, model, opt, sched, state, run) -> None:
    """Atomically write resumable training state (written to a temp file, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT + ".tmp")
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "state": state, "run": run,
                "rng": torch.get_rng_state(), "cuda_rng": cuda_rng}, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def _load_checkpoint(folder, model, opt, sched, run) -> dict | None:
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        log.warning("no checkpoint at %s: starting from step 0", path)
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved_run = ckpt["run"]
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read training checkpoint {path}: {err}; delete it to "
                         "start over") from err
    if saved_run != run:
        raise ValueError(f"training checkpoint {path} belongs to another run ({saved_run}, "
                         f"this run: {run}); repeat the interrupted command unchanged with "
                         "--resume, or delete the checkpoint to start over")
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    except (RuntimeError, ValueError) as err:  # shapes of another model (e.g. other sparsity)
        raise ValueError(f"training checkpoint {path} does not fit this model: {err}; "
                         "repeat the interrupted command unchanged, or delete it") from err
    sched.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    log.info("resumed from %s at step %d", path, ckpt["state"]["step"])
    return ckpt["state"]
