"""Asynchronous durability of checkpoints (issue 18): a save returns once the folder is renamed
into place, its fsyncs run in the background (``ck.Durability``), nothing deletes an older
checkpoint before the newer one is durable, a failed fsync surfaces, and a checkpoint torn by a
power cut (what an unfinished fsync can leave) is skipped for the previous one on resume.

The fsync is slowed or failed through ``ck.Durability(fsync=...)``, functrain's own hook (os.fsync
itself is never replaced)."""

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from functrain.io import checkpoint as ck
from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model, params_of

HERE = os.path.dirname(os.path.abspath(__file__))


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "step": torch.tensor(seed)}


def _save(out, step, durability=None):
    return ck.save_tree_checkpoint(str(out), step, _state(step), {"global_step": step}, durability=durability)


class GatedFsync:
    """An fsync that waits for ``gate`` and records the inode of every descriptor it made durable."""

    def __init__(self):
        self.gate = threading.Event()
        self.done: list[int] = []

    def __call__(self, fd):
        self.gate.wait(timeout=60)  # bounded: a failing test never leaves a thread blocked at exit
        os.fsync(fd)
        self.done.append(os.fstat(fd).st_ino)


@pytest.fixture
def fsync():
    gated = GatedFsync()
    yield gated
    gated.gate.set()  # also when the test failed with the gate closed


def _inodes(path):
    found = {os.stat(path).st_ino, os.stat(os.path.dirname(path)).st_ino}
    found |= {os.stat(os.path.join(path, n)).st_ino for n in os.listdir(path)}
    return found


def test_save_returns_before_durability_and_wait_durable_completes_it(tmp_path, fsync):
    d = ck.Durability(fsync=fsync)
    path = _save(tmp_path, 1, d)
    # Returned with no fsync done: the checkpoint is complete and verifiable (a process crash now loses nothing).
    assert fsync.done == [] and d.pending() == [path]
    ck.verify_checkpoint(path)
    waiter = threading.Thread(target=ck.wait_durable, args=(d,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "wait_durable returned while the fsyncs were still blocked"
    fsync.gate.set()
    waiter.join()
    assert d.pending() == []
    # Every file, the manifest, the folder and its parent (the rename) were fsynced.
    assert set(fsync.done) == _inodes(path)
    assert os.path.exists(os.path.join(path, ck.MANIFEST_FILE))


def test_rotation_keeps_the_old_checkpoint_until_the_new_one_is_durable(tmp_path, fsync, monkeypatch):
    monkeypatch.setattr(ck, "DURABILITY", ck.Durability(fsync=fsync))
    fsync.gate.set()
    old = _save(tmp_path, 1)
    ck.wait_durable()
    fsync.gate.clear()
    new = _save(tmp_path, 2)
    rotation = threading.Thread(target=ck.rotate_checkpoints, args=(str(tmp_path), 1))
    rotation.start()
    rotation.join(0.3)
    assert rotation.is_alive() and os.path.isdir(old), "the old checkpoint went before the new one was durable"
    fsync.gate.set()
    rotation.join()
    assert not os.path.exists(old) and _inodes(new) <= set(fsync.done)


class DeletionWatch:
    """An fsync slow enough that a rotation not waiting for it would delete the previous checkpoint
    while it runs; it records every such moment (the previous checkpoint of the one being fsynced
    is gone)."""

    def __init__(self, out):
        self.out, self.violations, self.calls = str(out), [], 0

    def __call__(self, fd):
        time.sleep(0.01)
        os.fsync(fd)
        self.calls += 1
        name = os.path.basename(os.path.realpath(f"/proc/self/fd/{fd}"))
        owner = os.readlink(f"/proc/self/fd/{fd}")
        step = next((int(p.split("-")[1]) for p in owner.split(os.sep) if ck.CHECKPOINT_RE.match(p)), None)
        if step is not None and step > 1 and not os.path.isdir(ck.checkpoint_path(self.out, step - 1)):
            self.violations.append((step, name))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the fsynced file's path from /proc")
def test_trainer_rotation_waits_for_durability(tmp_path, monkeypatch):
    out = tmp_path / "out"
    watch = DeletionWatch(out)
    monkeypatch.setattr(ck, "DURABILITY", ck.Durability(fsync=watch))
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=1,
                             save_total_limit=1, report_to="none", disable_tqdm=True, seed=7)
    Trainer(model=make_model(), args=args, train_dataset=make_dataset(n=16)).train()
    assert watch.calls > 0 and watch.violations == []
    assert [s for s, _ in ck.checkpoint_dirs(str(out))] == [4]


def test_train_returns_with_every_checkpoint_durable(tmp_path, monkeypatch):
    def slow_fsync(fd):
        time.sleep(0.02)
        os.fsync(fd)

    monkeypatch.setattr(ck, "DURABILITY", ck.Durability(fsync=slow_fsync))
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, save_strategy="steps",
                             save_steps=1, report_to="none", disable_tqdm=True, seed=7)
    Trainer(model=make_model(), args=args, train_dataset=make_dataset(n=16)).train()
    assert ck.DURABILITY.pending() == []


def _failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")


def test_a_failed_background_fsync_is_raised_at_the_next_wait(tmp_path):
    d = ck.Durability(fsync=_failing_fsync)
    path = _save(tmp_path, 1, d)  # the save itself succeeds: the fsync fails later
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-1.*not durable: fsync failed.*Input/output error"):
        ck.wait_durable(d)
    ck.wait_durable(d)  # reported once
    assert os.path.isdir(path)


def test_a_failed_background_fsync_is_raised_at_the_next_save_before_it_writes(tmp_path):
    d = ck.Durability(fsync=_failing_fsync)
    _save(tmp_path, 1, d)
    while d.pending():  # the failure has happened (not yet reported)
        time.sleep(0.01)
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-1.*fsync failed"):
        _save(tmp_path, 2, d)
    assert [s for s, _ in ck.checkpoint_dirs(str(tmp_path))] == [1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_trainer_raises_a_failed_background_fsync(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "DURABILITY", ck.Durability(fsync=_failing_fsync))
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, save_strategy="steps",
                             save_steps=1, report_to="none", disable_tqdm=True, seed=7)
    with pytest.raises(ck.CheckpointError, match="fsync failed"):
        Trainer(model=make_model(), args=args, train_dataset=make_dataset(n=16)).train()


def test_same_step_replacement_makes_the_new_folder_durable_before_deleting_the_old(tmp_path, fsync):
    d = ck.Durability(fsync=fsync)
    fsync.gate.set()
    _save(tmp_path, 1, d)
    ck.wait_durable(d)
    fsync.gate.clear()
    calls = len(fsync.done)
    path = ck.save_tree_checkpoint(str(tmp_path), 1, _state(5), {"global_step": 1}, durability=d)
    # Replaced synchronously (os.fsync, not the background queue): nothing pending, new contents in place.
    assert d.pending() == [] and len(fsync.done) == calls
    state, _ = ck.load_tree(ck.read_checkpoint(path), _state(0))
    assert torch.equal(state["w"], _state(5)["w"])


_EXIT_SCRIPT = """
import os, sys, time
from functrain.io import checkpoint as ck
import torch
log = sys.argv[2]
def slow_fsync(fd):
    time.sleep(0.05)
    os.fsync(fd)
    with open(log, "a") as f:
        f.write("x")
ck.DURABILITY.fsync = slow_fsync
ck.save_tree_checkpoint(sys.argv[1], 1, {"w": torch.ones(8)}, {"global_step": 1})
assert ck.DURABILITY.pending()
"""


def test_process_exit_waits_for_the_background_fsync(tmp_path):
    log = tmp_path / "fsyncs.log"
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(out), str(log)], check=True, cwd=HERE,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])})
    assert len(log.read_text()) == len(_inodes(ck.checkpoint_path(str(out), 1)))


def _zero(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes(size))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("tear", ["zeroed_state", "truncated_weights", "empty_manifest"])
def test_a_checkpoint_torn_by_a_power_cut_falls_back_to_the_previous_one(tmp_path, tear):
    """What a power cut before the background fsync finished can leave (data blocks never written:
    zeros, a short file, an empty manifest) is detected on resume, which continues from the
    previous checkpoint exactly."""

    def trainer(out, steps):
        args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                                 save_strategy="steps", save_steps=1, report_to="none", disable_tqdm=True, seed=7)
        return Trainer(model=make_model(), args=args, train_dataset=make_dataset(n=16))

    reference = trainer(tmp_path / "ref", 3)
    reference.train()
    out = tmp_path / "out"
    trainer(out, 2).train()
    newest = ck.checkpoint_path(str(out), 2)
    {"zeroed_state": lambda: _zero(os.path.join(newest, ck.STATE_FILE)),
     "truncated_weights": lambda: _truncate(os.path.join(newest, ck.MODEL_FILE)),
     "empty_manifest": lambda: os.truncate(os.path.join(newest, ck.MANIFEST_FILE), 0)}[tear]()
    assert ck.find_resumable_checkpoint(str(out)) == ck.checkpoint_path(str(out), 1)
    resumed = trainer(out, 3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert [n for n in os.listdir(out) if n.startswith("checkpoint-2.broken-")]  # kept aside, not resumed
    ours, ref = params_of(resumed), params_of(reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
