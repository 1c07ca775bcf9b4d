"""Data parallelism on PyTorch's own stack: ``torchrun`` + ``torch.distributed`` (+ DDP).

Launched with ``torchrun --nproc_per_node N -m pgb ...``, every rank runs the same command:

- calibration (importance, compensation): rank r takes calibration batches r, r + N, ...
  and the sums are all-reduced, so every rank ends with the statistics of the whole sample
  (equal to a single-process run up to float summation order);
- re-finetuning: DDP, rank r takes batches r, r + N, ... of the same seeded order;
- evaluation and outputs: rank 0 only; the other ranks wait and print nothing.

The backend is NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is available,
gloo on the CPU otherwise: no code change between the two. Outside ``torchrun`` every
helper is a no-op (rank 0 of a world of 1).

Example::

    >>> mine = shard(batches)          # this rank's share of the calibration batches
    >>> all_reduce_sum(total)          # in place: the sum over ranks
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Rank 0 alone evaluates and writes while the others wait at a barrier; scoring a large dev
# set on the CPU can outlast the default collective timeout (10-30 min).
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment; True if this call did.

    NCCL with this rank's GPU (``LOCAL_RANK``) when CUDA is available, gloo otherwise. A
    world of 1 under torchrun is initialised too, so the GPU path is the same at any size.
    """
    if active() or not launched() or not dist.is_available():
        return False
    if torch.cuda.is_available():
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if local.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"torchrun started local rank {local.index}, but this machine shows "
                f"{torch.cuda.device_count()} CUDA device(s) and pgb runs one process per "
                f"GPU: use --nproc_per_node {torch.cuda.device_count()}, or hide the GPUs "
                "(CUDA_VISIBLE_DEVICES=) to run the processes on the CPU")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=local)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def cleanup() -> None:
    """Leave the process group (if any)."""
    if active():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, shows progress and writes outputs."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank's model lives: ``cuda:LOCAL_RANK`` under torchrun with NCCL, else CPU.

    Single-process runs keep the CPU, as before.
    """
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if active():
        dist.barrier()


def shard(batches) -> list:
    """This rank's share of ``batches``: items r, r + world, r + 2 world, ...

    The union over ranks is exactly ``batches``, so sums over the shards, all-reduced,
    equal the sum over all batches. Single-process: ``batches`` unchanged.
    """
    if world() == 1:
        return batches
    return list(batches)[rank()::world()]


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Replace each tensor by its sum over ranks, in place (no-op single-process).

    Several tensors of one dtype and device travel in one collective (flattened together).
    """
    if world() == 1 or not tensors:
        return
    if len(tensors) == 1:
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (sum of numel,)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def from_main(compute):
    """``compute()`` on rank 0, its (picklable) result handed to every rank; the other ranks
    wait. For answers that must agree across ranks but are measured, not derived: a timing
    taken on each rank would differ. Single-process: ``compute()``."""
    if world() == 1:
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
