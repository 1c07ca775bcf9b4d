"""Data parallelism: two CPU processes (torchrun, gloo) agree with one process.

Each launch runs real ``torchrun --standalone --nproc_per_node 2`` children, single-threaded:
this file itself is the worker of the library checks (``python tests/test_distributed.py
--worker OUT``); the CLI check runs ``-m pgb compress``. Calibration uses 5 batches, so
the two shards are uneven (3 + 2).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny import save_tiny_bert, tiny_batch, tiny_model

import pgb
from pgb import distributed as dist
from pgb.checkpoint import save_compact
from pgb.compensate import apply_masks, compensate
from pgb.config import TrainConfig
from pgb.finetune import train
from pgb.importance import importance_scores
from pgb.surgery import to_compact

WORLD = 2
TIMEOUT_S = 300  # a generous ceiling: two busy cores may be shared with other jobs


def calib() -> list[dict]:
    return [tiny_batch(n=4, length=11, seed=s) for s in range(5)]


def train_batches(epoch: int) -> list[dict]:
    return [tiny_batch(n=4, length=11, seed=100 * epoch + i) for i in range(6)]


def compressed(teacher):
    """The masked, compensated student (dense) and its recipe; two dropped sublayers."""
    from test_surgery import make_recipe

    recipe = make_recipe(teacher, 0.55, weak=("0.attn", "1.ffn"))
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)
    compensate(student, teacher, recipe, calib(), progress=False)
    return student, recipe


@contextlib.contextmanager
def one_thread():
    """The single-process reference runs on one thread as the ranks do: BLAS splits float32
    products by thread count, and a cancelling entry would differ by more than rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with single-threaded CPU children."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, also on a machine with one GPU
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


# --------------------------------------------------------------------------- worker


def worker(out: Path) -> None:
    """One rank: importance, compensation and a DDP re-finetune; results to ``out``."""
    torch.set_num_threads(1)
    assert dist.init_from_env() and dist.world() == WORLD
    rank = dist.rank()
    teacher = tiny_model("bert")
    result = {m: importance_scores(teacher, calib(), m, progress=False)
              for m in ("fisher", "activation")}
    student, recipe = compressed(teacher)
    result["compensated"] = copy.deepcopy(student.state_dict())
    compact = to_compact(student, recipe)
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, warmup_ratio=0.0, kd_hidden=1.0)
    result["train"] = train(compact, train_batches, cfg, teacher=teacher, progress=False)
    result["trained"] = compact.state_dict()
    result["from_main"] = dist.from_main(lambda: f"measured on rank {rank}")
    torch.save(result, out / f"rank{rank}.pt")
    if dist.is_main():
        folder = out / "compact"
        folder.mkdir()
        save_compact(compact, None, folder)
    dist.barrier()
    dist.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist")
    torchrun(str(Path(__file__).resolve()), "--worker", str(out), cwd=out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- library


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """Rank 1 of two on a machine with one GPU names the counts and the fix before it
    touches the device (where CUDA's own error would be "invalid device ordinal")."""
    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _d: pytest.fail("device was set"))
    assert not dist.active()
    with pytest.raises(RuntimeError, match=r"local rank 1.*1 CUDA device.*--nproc_per_node 1"):
        dist.init_from_env()


def test_helpers_are_no_ops_in_one_process():
    t = torch.arange(3.0)
    dist.all_reduce_sum(t)
    batches = calib()
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert torch.equal(t, torch.arange(3.0)) and dist.shard(batches) is batches
    assert dist.device() == torch.device("cpu")
    assert dist.from_main(lambda: 5) == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fisher", "activation"])
def test_importance_equals_single_process(ranks, method):
    with one_thread():
        single = importance_scores(tiny_model("bert"), calib(), method, progress=False)
    for result in ranks[1]:
        assert result[method].keys() == single.keys()
        for name, s in single.items():
            assert torch.allclose(result[method][name], s, rtol=1e-5, atol=1e-12), name


@pytest.mark.slow
def test_compensation_equals_single_process(ranks):
    with one_thread():
        single = compressed(tiny_model("bert"))[0].state_dict()
    for result in ranks[1]:
        for name, w in single.items():
            assert torch.allclose(result["compensated"][name], w, rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_refinetune_ranks_agree_and_saved_model_loads(ranks):
    out, (r0, r1) = ranks
    assert r0["train"]["steps"] == r1["train"]["steps"] == 3
    # a measured answer (the speed-up budget's sparsity) is rank 0's on every rank
    assert r0["from_main"] == r1["from_main"] == "measured on rank 0"
    for name, w in r0["trained"].items():
        assert torch.equal(w, r1["trained"][name]), name  # DDP: identical updates
    model = pgb.load(out / "compact")
    for name, w in model.state_dict().items():
        assert torch.equal(w, r0["trained"][name]), name
    start = to_compact(*compressed(tiny_model("bert"))).state_dict()
    assert any(not torch.equal(start[n], w) for n, w in r0["trained"].items())  # it trained
    with torch.no_grad():
        logits = model(**{k: v for k, v in tiny_batch().items() if k != "labels"}).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, minilm_path) -> Path:
    """A tiny random BERT classifier (2 labels) with the real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-teacher"), minilm_path,
                          transformers.BertForSequenceClassification)


@pytest.mark.slow
def test_cli_compress_on_two_processes_writes_one_folder(tiny_teacher, shared_data, tmp_path):
    out = tmp_path / "runs" / "compressed"
    proc = torchrun("-m", "pgb", "-q", "compress", "--model", str(tiny_teacher), "--task",
                    "sst2", "--data-dir", str(shared_data), "--out", str(out),
                    "--sparsity", "0.5", "--calib-samples", "48", "--refinetune-steps", "2",
                    "--max-train-samples", "96", "--checkpoint-every", "1", cwd=tmp_path)
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, proc.stdout  # rank 0 alone prints the result
    summary = json.loads(printed[0])
    report = json.loads((out / "report.json").read_text())
    assert summary["metrics"] == report["metrics"] and "accuracy" in report["metrics"]
    assert report["refinetune"]["steps"] == 2 and report["world_size"] == WORLD
    assert abs(report["achieved_sparsity"] - 0.5) <= 0.005
    assert [p.name for p in out.parent.iterdir()] == ["compressed"]  # no temp, no resume
    model = pgb.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch(labels=None)).logits).all()


if __name__ == "__main__":  # a torchrun child: python tests/test_distributed.py --worker OUT
    assert sys.argv[1] == "--worker", sys.argv
    worker(Path(sys.argv[2]))
