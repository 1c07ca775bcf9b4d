"""Configuration dataclasses: every knob with its help text, validated on construction.

Unknown keys are errors (``from_dict``); the resolved config is saved beside every output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields


def _help(text: str, default, **kw):
    return field(default=default, metadata={"help": text}, **kw)


class _Base:
    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig(_Base):
    """Fine-tuning (teacher) and re-finetuning (student) settings."""

    epochs: float = _help("passes over the training data (ignored when max_steps is set)", 3.0)
    max_steps: int | None = _help("stop after this many optimizer steps", None)
    batch_size: int = _help("examples per optimizer step", 32)
    lr: float = _help("peak AdamW learning rate", 5e-5)
    weight_decay: float = _help("AdamW weight decay (not on biases and LayerNorm)", 0.01)
    warmup_ratio: float = _help("fraction of steps with linear warm-up", 0.1)
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    seed: int = _help("seed of initialisation, shuffling and dropout", 42)
    kd_alpha: float = _help("weight of the distillation loss (task loss gets 1 - kd_alpha)", 0.9)
    kd_temperature: float = _help("softmax temperature of the logit distillation", 2.0)
    kd_hidden: float = _help("weight of the layer-output (hidden state) distillation", 0.0)
    checkpoint_every: int = _help("steps between resumable checkpoints (0: never)", 0)

    def __post_init__(self):
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


IMPORTANCE = ("fisher", "magnitude", "activation")
METHODS = ("pgb", "magnitude", "structured")
EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")
COMPENSATION_TARGETS = ("stream", "local")
COMPENSATION_PRIORS = ("zero", "teacher")


@dataclass(frozen=True)
class CompressConfig(_Base):
    """One-shot compression settings (the pgb method and its ablations)."""

    sparsity: float = _help("fraction of encoder linear weights to remove, in [0, 1)", 0.5)
    method: str = _help(f"compression method, one of {METHODS}", "pgb")
    flops_ratio: float | None = _help("budget in encoder FLOPs instead (at sequence length "
                                      "128, relative to the teacher, in (0, 1]): the "
                                      "smallest sparsity whose plan meets it is used, and "
                                      "recorded in 'sparsity'", None)
    speedup: float | None = _help("budget as a speed-up over the teacher instead (> 1), "
                                  "measured on this machine at speedup_batch_size x "
                                  "speedup_seq_len: the smallest sparsity whose model runs "
                                  "that fast is used, and recorded in 'sparsity'", None)
    speedup_batch_size: int = _help("batch size the speed-up budget is measured at", 32)
    speedup_seq_len: int = _help("sequence length the speed-up budget is measured at", 128)
    calib_samples: int = _help("training examples used for importance and compensation", 1024)
    calib_batch_size: int = _help("batch size of the calibration passes", 32)
    importance: str = _help(f"importance score, one of {IMPORTANCE}", "fisher")
    normalize: str = _help("importance scale across matrices: 'mean' (each matrix averages "
                           "1, so only its shape matters) or 'none' (raw scores)", "mean")
    permute: bool = _help("search permutations (False: contiguous blocks)", True)
    shared_order: bool = _help("one hidden-size permutation per sublayer, shared by its "
                               "matrices, so the compact model keeps the residual stream "
                               "in that order (2 gathers per layer instead of 6; less "
                               "freedom in the grouping)", False)
    uniform_groups: bool = _help("same G everywhere, G = 1 / (1 - sparsity)", False)
    allow_drop: bool = _help("allow dropping whole sublayers", True)
    allocation: str = _help("allocator objective: 'log' (sum of size x log retained "
                            "importance) or 'linear' (retained importance)", "log")
    max_groups: int = _help("largest group count considered", 16)
    search_iters: int = _help("alternating sweeps of the grouping search", 10)
    compensate: bool = _help("least-squares weight compensation after pruning", True)
    damping: float = _help("relative damping of the compensation least squares", 0.01)
    compensation_prior: str = _help("what the damping pulls compensated weights towards: "
                                    "'zero' (ridge) or 'teacher' (the pruned matrix's own "
                                    "weights)", "zero")
    compensation_target: str = _help("'stream': match the teacher on its own stream (corrects "
                                     "drift); 'local': the teacher's layer on the student's "
                                     "input", "stream")
    refinetune: bool = _help("re-finetune the compressed model", True)
    distill: bool = _help("distil from the teacher during re-finetuning", True)
    refinetune_epochs: float = _help("re-finetuning epochs (ignored with refinetune_steps)", 1.0)
    refinetune_steps: int | None = _help("re-finetuning optimizer steps", None)
    refinetune_lr: float = _help("re-finetuning learning rate", 1e-4)
    kd_hidden: float = _help("weight of hidden-state distillation in re-finetuning "
                             "(0: logits only, the default: it did not help on MRPC or "
                             "STS-B)", 0.0)
    max_train_samples: int | None = _help("cap on re-finetuning examples", None)
    teacher_cache: str | None = _help("folder that keeps the teacher's outputs on "
                                      "re-finetuning batches between runs, so that later "
                                      "runs on the same teacher and batches skip its forward "
                                      "pass (results unchanged)", None)
    max_length: int = _help("token length of calibration and training examples", 128)
    batch_size: int = _help("re-finetuning batch size", 32)
    seed: int = _help("seed of sampling, search and training", 0)
    checkpoint_every: int = _help("re-finetuning steps between resumable checkpoints", 100)
    embedding_dtype: str = _help(f"precision the token-embedding table is rounded to and "
                                 f"stored in, one of {EMBEDDING_DTYPES} (float16 halves the "
                                 f"largest dense tensor; computation stays float32)",
                                 "float32")

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}; e.g. --sparsity "
                             "0.5 removes half of the encoder linear weights")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.flops_ratio is not None and not 0.0 < self.flops_ratio <= 1.0:
            raise ValueError(f"flops_ratio must be in (0, 1], got {self.flops_ratio}; "
                             "e.g. --flops-ratio 0.5 halves the encoder FLOPs")
        if self.speedup is not None and not self.speedup > 1.0:
            raise ValueError(f"speedup must be > 1, got {self.speedup}; e.g. --speedup 2 asks "
                             "for a model twice as fast as the teacher")
        if self.speedup_batch_size < 1 or self.speedup_seq_len < 1:
            raise ValueError(f"the speed-up shape must be positive, got batch "
                             f"{self.speedup_batch_size} x {self.speedup_seq_len}")
        budget = self.budget_flag()
        if budget is not None:
            if self.flops_ratio is not None and self.speedup is not None:
                raise ValueError("give one budget: --flops-ratio or --speedup, not both")
            if self.method == "magnitude":
                raise ValueError(f"a {budget} budget needs --method pgb or structured: "
                                 "magnitude pruning keeps dense shapes, so its FLOPs and "
                                 "speed do not change; use --sparsity")
            if self.uniform_groups:
                raise ValueError(f"--uniform-groups fixes G from the sparsity; use --sparsity "
                                 f"with it, not {budget}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; choose one of {IMPORTANCE}")
        if self.normalize not in ("mean", "none"):
            raise ValueError(f"normalize must be 'mean' or 'none', got {self.normalize!r}")
        if self.allocation not in ("log", "linear"):
            raise ValueError(f"allocation must be 'log' or 'linear', got {self.allocation!r}")
        if self.compensation_target not in COMPENSATION_TARGETS:
            raise ValueError(f"compensation_target must be one of {COMPENSATION_TARGETS}, got "
                             f"{self.compensation_target!r}")
        if self.compensation_prior not in COMPENSATION_PRIORS:
            raise ValueError(f"compensation_prior must be one of {COMPENSATION_PRIORS}, got "
                             f"{self.compensation_prior!r}")
        if self.calib_samples < 1:
            raise ValueError(f"calib_samples must be >= 1, got {self.calib_samples}")
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {self.max_groups}")
        if self.refinetune_steps is not None and self.refinetune_steps < 1:
            raise ValueError(f"refinetune_steps must be >= 1, got {self.refinetune_steps}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"unknown embedding_dtype {self.embedding_dtype!r}; choose one of "
                             f"{EMBEDDING_DTYPES}")
        if self.method == "magnitude" and self.embedding_dtype != "float32":
            raise ValueError(f"embedding_dtype {self.embedding_dtype!r} needs a pgb or "
                             "structured checkpoint; the magnitude baseline writes a plain "
                             "float32 transformers folder (use --embedding-dtype float32)")
        if self.refinetune_epochs <= 0:
            raise ValueError(f"refinetune_epochs must be > 0, got {self.refinetune_epochs}")
        if not self.refinetune_lr > 0:
            raise ValueError(f"refinetune_lr must be > 0, got {self.refinetune_lr}; e.g. "
                             "--refinetune-lr 1e-4")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}; e.g. "
                             "--refinetune-batch-size 32")

    def budget_flag(self) -> str | None:
        """The command-line flag of a budget other than sparsity, or None."""
        if self.flops_ratio is not None:
            return "--flops-ratio"
        return "--speedup" if self.speedup is not None else None

    def uniform_g(self) -> int:
        """The group count of the uniform ablation: largest G with 1 - 1/G <= sparsity."""
        return max(1, int(1.0 / (1.0 - self.sparsity) + 1e-9))

    def train_config(self) -> TrainConfig:
        """Re-finetuning settings derived from this config."""
        return TrainConfig(epochs=self.refinetune_epochs, max_steps=self.refinetune_steps,
                           batch_size=self.batch_size, lr=self.refinetune_lr, seed=self.seed,
                           kd_alpha=0.9 if self.distill else 0.0, kd_hidden=self.kd_hidden,
                           checkpoint_every=self.checkpoint_every)
