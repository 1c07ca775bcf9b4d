"""The teacher-output cache: exact (the same student with or without it), shared, persistent."""

from __future__ import annotations

import copy

import pytest
import torch

from pgb.config import TrainConfig
from pgb.finetune import train
from pgb.teacher_cache import TeacherOutputs, batch_key, fingerprint
from tests.tiny import tiny_batch, tiny_model

CFG = TrainConfig(max_steps=6, batch_size=5, lr=1e-3, seed=3, kd_alpha=0.7)


def qa_batch(n: int, length: int, seed: int) -> dict:
    batch = tiny_batch(n=n, length=length, seed=seed, labels=None)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, length - 4, (n,), generator=g)
    return {**batch, "start_positions": start, "end_positions": start + 2}


def batches(per_epoch: int = 3, qa: bool = False):
    data = [qa_batch(5, 9 + i, i) if qa else tiny_batch(n=5, length=9 + i, seed=i, labels=2)
            for i in range(per_epoch)]
    return lambda epoch: data[epoch % per_epoch:] + data[:epoch % per_epoch]


def trained(student, teacher, cfg=CFG, qa=False):
    student = copy.deepcopy(student)
    info = train(student, batches(qa=qa), cfg, teacher=teacher, progress=False)
    return student, info


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("qa", [False, True])
def test_cached_outputs_train_the_same_student(qa):
    teacher = tiny_model("bert", num_labels=2, seed=1, qa=qa)
    student = tiny_model("bert", num_labels=2, seed=2, qa=qa).train()
    ref, ref_info = trained(student, teacher, qa=qa)
    outputs = TeacherOutputs(teacher)
    first, _ = trained(student, outputs, qa=qa)  # fills the store: 3 batches, 6 steps
    assert (outputs.misses, outputs.hits) == (3, 3)
    again, info = trained(student, outputs, qa=qa)  # every batch known now
    assert (outputs.misses, outputs.hits) == (3, 9)
    assert same_weights(ref, first) and same_weights(ref, again)
    assert info["final_loss"] == ref_info["final_loss"]
    assert not same_weights(ref, student)  # training did change the student


def test_a_single_run_keeps_nothing_and_a_sweep_shares(shared_data, tmp_path):
    """Without a folder nothing is stored unless a sweep's later budgets will read it."""
    from pgb.taskdata import TaskData
    from pgb.tasks import get_task

    teacher = tiny_model("bert", num_labels=2, seed=1)
    student = tiny_model("bert", num_labels=2, seed=2).train()
    ref, _ = trained(student, teacher)
    data = TaskData(get_task("sst2"), None, data_dir=shared_data, max_samples=8)
    single = data.teacher_outputs(teacher)
    result, _ = trained(student, single)
    assert same_weights(ref, result)
    assert (single.misses, single.hits, single.store) == (6, 0, {})
    assert data.teacher_outputs(teacher) is not single  # nothing to share
    filed = data.teacher_outputs(teacher, tmp_path)  # a folder: kept for the file
    trained(student, filed)
    assert (filed.misses, len(filed.store)) == (3, 3)
    data.share_teacher_outputs = True  # what compress_sweep sets for several budgets
    shared = data.teacher_outputs(teacher)
    trained(student, shared)
    assert data.teacher_outputs(teacher) is shared and len(shared.store) == 3


def test_file_cache_persists_and_is_keyed_by_the_teacher(tmp_path):
    teacher = tiny_model("bert", num_labels=2, seed=1)
    student = tiny_model("bert", num_labels=2, seed=2).train()
    ref, _ = trained(student, teacher)
    first = TeacherOutputs(teacher, tmp_path)
    trained(student, first)
    first.save()
    assert first.path.is_file() and first.path.parent == tmp_path
    second = TeacherOutputs(teacher, tmp_path)  # a later run: every batch from the file
    result, _ = trained(student, second)
    assert (second.misses, second.hits) == (0, 6)
    assert same_weights(ref, result)
    other = tiny_model("bert", num_labels=2, seed=4)  # other weights: another file
    assert fingerprint(other) != fingerprint(teacher)
    assert TeacherOutputs(other, tmp_path).store == {}


def test_damaged_cache_file_is_ignored_and_rewritten(tmp_path, caplog):
    teacher = tiny_model("bert", num_labels=2, seed=1)
    path = tmp_path / f"{fingerprint(teacher)}.pt"
    path.write_bytes(b"not a torch file")
    outputs = TeacherOutputs(teacher, tmp_path)
    assert outputs.store == {} and "unreadable teacher-output cache" in caplog.text
    trained(tiny_model("bert", num_labels=2, seed=2).train(), outputs)
    outputs.save()
    assert len(TeacherOutputs(teacher, tmp_path).store) == 3


def test_batch_key_sees_every_input():
    batch = {k: v for k, v in tiny_batch(n=4, length=7).items() if k != "labels"}
    base = batch_key(batch)
    changed = dict(batch, attention_mask=batch["attention_mask"].clone())
    changed["attention_mask"][0, -1] = 1 - changed["attention_mask"][0, -1]
    assert batch_key(changed) != base
    assert batch_key({**batch, "input_ids": batch["input_ids"][:, :-1]}) != base
    assert batch_key(dict(reversed(list(batch.items())))) == base  # names, not order


def test_hidden_state_distillation_bypasses_the_cache():
    teacher = tiny_model("bert", num_labels=2, seed=1)
    student = tiny_model("bert", num_labels=2, seed=2).train()
    cfg = TrainConfig(max_steps=3, batch_size=5, lr=1e-3, seed=3, kd_alpha=0.7, kd_hidden=0.5)
    outputs = TeacherOutputs(teacher)
    ref, _ = trained(student, teacher, cfg)
    result, _ = trained(student, outputs, cfg)
    assert outputs.hits == outputs.misses == 0
    assert same_weights(ref, result)
