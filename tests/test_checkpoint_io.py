"""Checkpoint I/O costs: hashes taken as files are written (no read-back), and a resume that reads
each byte of the checkpoint once and loads exactly the bytes it verified."""

import json
import os

import pytest
import torch
import xxhash
from torch import nn

import functrain as ft
from functrain.io import checkpoint as ck
from functrain.trainer.args import TrainingArguments
from functrain.trainer.callbacks import TrainerCallback, TrainerState
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model, params_of


class Mixed(nn.Module):
    """Leaves of several dtypes and shapes (bf16, 0-d, empty, bool): every byte layout is hashed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.low = nn.Parameter(torch.randn(7, 3).to(torch.bfloat16))
        self.register_buffer("scalar", torch.tensor(2.5))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _state(model):
    tx = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, tx, seed=3, copy=True)
    grads = {n: torch.randn_like(p) for n, p in state.params.items()}
    _, opt = tx.update(grads, state.opt_state, state.params)  # non-zero moments
    return state.replace(opt_state=opt)  # (params stay the model's: the weights file holds those)


def _file_xxh3(path):
    with open(path, "rb") as f:
        return xxhash.xxh3_128(f.read()).hexdigest()


def _save(tmp_path, model=None):
    model = model or Mixed()
    state = _state(model)
    path = ck.save_checkpoint(str(tmp_path / "out"), 1, model=model, train_state=state,
                              trainer_state=TrainerState(global_step=1))
    return path, model, state


def test_own_files_are_hashed_while_written_not_read_back(tmp_path, monkeypatch):
    read_back = []
    hash_file = ck.file_entry
    monkeypatch.setattr(ck, "file_entry", lambda p, *a: read_back.append(os.path.basename(p)) or hash_file(p, *a))
    path, _, _ = _save(tmp_path)
    # The weights, train state and generators are functrain's own safetensors: none is read back;
    # only the JSON a library wrote (trainer_state.json) is.
    assert read_back == [ck.TRAINER_STATE_FILE]
    manifest = ck.read_manifest(path)
    for rel in (ck.MODEL_FILE, ck.STATE_FILE, ck.RNG_FILE, ck.TRAINER_STATE_FILE):
        full = os.path.join(path, rel)
        assert manifest["files"][rel] == {"xxh3_128": _file_xxh3(full), "bytes": os.path.getsize(full)}
    ck.verify_checkpoint(path)


class _CountingFile:
    """A file object that adds every byte read through it to ``counts[its file name]``."""

    def __init__(self, f, name, counts):
        self._f, self._name, self._counts = f, name, counts

    def _add(self, n):
        self._counts[self._name] = self._counts.get(self._name, 0) + n

    def read(self, *args):
        data = self._f.read(*args)
        self._add(len(data))
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._add(n)
        return n

    def __getattr__(self, name):  # fileno, close, ...
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _counting_reads(monkeypatch):
    """Bytes read from checkpoint files, per file name, through every verified open; opening a
    safetensors file from the disk (a second read) fails."""
    counts = {}
    open_no_follow = ck._open_no_follow

    def counted_open(full):
        return _CountingFile(open_no_follow(full), os.path.basename(full), counts)

    def no_disk(path):
        raise AssertionError(f"{path} was opened from the disk again after it was verified")

    monkeypatch.setattr(ck, "_open_no_follow", counted_open)
    monkeypatch.setattr(ck, "open_safetensors", no_disk)
    return counts


def _listed_sizes(path):
    return {rel: entry["bytes"] for rel, entry in ck.read_manifest(path)["files"].items()}


def test_read_checkpoint_reads_each_byte_once_and_loads_it(tmp_path, monkeypatch):
    path, model, state = _save(tmp_path)
    counts = _counting_reads(monkeypatch)
    found = ck.read_checkpoint(path)
    assert ck.non_finite_tensors(found) == []
    ck.check_optimizer_structure(found, state)
    loaded = ck.load_train_state(found, _state(Mixed()), model)
    ck.load_rng_state(found)
    assert counts == _listed_sizes(path)  # every listed byte once, nothing more
    for a, b in zip(ft.tree.leaves(loaded), ft.tree.leaves(state)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_loading_uses_the_verified_bytes_not_the_disk(tmp_path):
    path, model, state = _save(tmp_path)
    found = ck.read_checkpoint(path)
    with open(os.path.join(path, ck.STATE_FILE), "r+b") as f:  # changed on disk after verification
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\x7f")
    loaded = ck.load_train_state(found, _state(Mixed()), model)
    assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(loaded), ft.tree.leaves(state)))
    with pytest.raises(ck.CheckpointError, match="fails its checksum"):
        ck.read_checkpoint(path)


def test_loaded_leaves_are_writable_and_independent(tmp_path):
    path, model, state = _save(tmp_path)
    loaded = ck.load_train_state(ck.read_checkpoint(path), _state(Mixed()), model)
    before = loaded.params["lin.weight"].clone()
    loaded.params["lin.weight"].add_(1.0)  # a donated step writes into its state
    assert torch.equal(loaded.params["lin.weight"], before + 1.0)
    assert torch.equal(state.params["lin.weight"], before)


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_read_checkpoint_refuses_a_file_of_another_size(tmp_path, change):
    path, _, _ = _save(tmp_path)
    target = os.path.join(path, ck.STATE_FILE)
    data = open(target, "rb").read()
    with open(target, "wb") as f:
        f.write(data + b"\0" if change == "longer" else data[:-1])
    with pytest.raises(ck.CheckpointError, match="bytes, the manifest says"):
        ck.read_checkpoint(path)


def test_read_checkpoint_refuses_a_symlinked_file(tmp_path):
    path, _, _ = _save(tmp_path)
    outside = tmp_path / "outside.safetensors"
    target = os.path.join(path, ck.STATE_FILE)
    os.replace(target, outside)
    os.symlink(outside, target)
    with pytest.raises(ck.CheckpointError, match="not a regular file"):
        ck.read_checkpoint(path)


def _rewrite_with(path, algorithm):
    """The manifest as a checkpoint hashed with ``algorithm`` has it (version 1 wrote sha256)."""
    manifest = ck.read_manifest(path)
    manifest["files"] = {rel: ck.file_entry(os.path.join(path, rel), algorithm) for rel in manifest["files"]}
    manifest["version"] = 1 if algorithm == "sha256" else ck.VERSION
    with open(os.path.join(path, ck.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class Undo(TrainerCallback):
    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def on_train_begin(self, args, state, control, **kwargs):
        self.monkeypatch.undo()


def _trainer(out, **kw):
    args = TrainingArguments(str(out), per_device_train_batch_size=6, num_train_epochs=2, learning_rate=0.05,
                             save_strategy="steps", save_steps=1, logging_steps=2, seed=7, report_to=[], **kw)
    return Trainer(model=make_model(), args=args, train_dataset=make_dataset())


@pytest.mark.parametrize("algorithm", sorted(ck.CHECKSUMS))
def test_trainer_resume_reads_the_checkpoint_once(tmp_path, monkeypatch, algorithm):
    """Also for every checksum: a checkpoint of manifest version 1 (sha256) resumes exactly."""
    reference = _trainer(tmp_path / "ref")
    reference.train()
    first = _trainer(tmp_path / "run")
    first.add_callback(StopAt(3))
    first.train()
    newest = ck.checkpoint_path(str(tmp_path / "run"), 3)
    _rewrite_with(newest, algorithm)
    counts = _counting_reads(monkeypatch)
    second = _trainer(tmp_path / "run")
    second.add_callback(Undo(monkeypatch))  # the resume is done: saving may read what it wrote
    second.train(resume_from_checkpoint=True)
    assert counts == _listed_sizes(newest)
    got, want = params_of(second), params_of(reference)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("algorithm", sorted(ck.CHECKSUMS))
def test_each_checksum_loads_and_detects_corruption(tmp_path, algorithm):
    path, model, state = _save(tmp_path)
    _rewrite_with(path, algorithm)
    for keep in (True, False):  # read-and-keep and verify-only hash differently
        loaded = ck.load_train_state(ck.read_checkpoint(path, keep=keep), _state(Mixed()), model)
        assert all(torch.equal(a, b) for a, b in zip(ft.tree.leaves(loaded), ft.tree.leaves(state)))
    target = os.path.join(path, ck.STATE_FILE)
    with open(target, "r+b") as f:  # one flipped bit in the data
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    for keep in (True, False):
        with pytest.raises(ck.CheckpointError, match=rf"train_state.safetensors.*fails its checksum \({algorithm}\)"):
            ck.read_checkpoint(path, keep=keep)
    data = open(target, "rb").read()
    with open(target, "wb") as f:  # truncated
        f.write(data[:-8])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.read_checkpoint(path)
    assert ck.find_resumable_checkpoint(os.path.dirname(path)) is None


@pytest.mark.parametrize("entry, problem", [
    ({"bytes": 3}, "one checksum"),
    ({"bytes": 3, "sha256": "ab" * 32, "xxh3_128": "ab" * 16}, "one checksum"),
    ({"bytes": 3, "xxh3_128": "ab" * 32}, "one checksum"),  # a sha256-long digest under xxh3_128
    ({"bytes": 3, "md5": "ab" * 16}, "one checksum"),
])
def test_manifest_entry_needs_exactly_one_known_checksum(tmp_path, entry, problem):
    path, _, _ = _save(tmp_path)
    manifest = ck.read_manifest(path)
    manifest["files"][ck.RNG_FILE] = entry
    with open(os.path.join(path, ck.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ck.CheckpointError, match=problem):
        ck.read_checkpoint(path)


def _safetensors_content(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).view(-1).view(torch.uint8).tolist() for k in sorted(f.keys())}


def _tiny_gpt2(ignore_on_save=()):
    from transformers import GPT2Config, GPT2LMHeadModel

    class Model(GPT2LMHeadModel):
        _keys_to_ignore_on_save = list(ignore_on_save)

    torch.manual_seed(0)
    return Model(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))


@pytest.mark.parametrize("ignored", [(), ("transformer.ln_f.weight",)], ids=["all-saved", "keys-ignored-on-save"])
def test_state_file_written_beside_the_model_file_equals_a_serial_write(tmp_path, ignored):
    """The state file is written in a background thread while save_pretrained writes the model,
    with the params the model file will hold predicted from the state dict. When save_pretrained
    drops keys (``_keys_to_ignore_on_save``), the state file is rewritten with those params: the
    files equal a serial write either way and the checkpoint loads the exact state."""
    model = _tiny_gpt2(ignored)
    state = _state(model)
    state = state.replace(params={n: p + 0.5 for n, p in state.params.items()})  # not the module's weights
    model.load_state_dict({**model.state_dict(), **state.params})  # what the Trainer writes back before saving
    path = ck.save_checkpoint(str(tmp_path / "out"), 1, model=model, train_state=state,
                              trainer_state=TrainerState(global_step=1))
    serial = tmp_path / "serial"
    serial.mkdir()
    ck.write_train_state(state, model, str(serial), model_keys=set(ck.weights_index(path)))
    # (not byte for byte: safetensors orders the metadata keys differently from one write to the next)
    assert _safetensors_content(os.path.join(path, ck.STATE_FILE)) == _safetensors_content(serial / ck.STATE_FILE)
    in_state_file = set(ck.read_checkpoint(path).tensors(ck.STATE_FILE))
    assert ("params.transformer.ln_f.weight" in in_state_file) == bool(ignored)
    assert not set(ignored) & set(ck.weights_index(path))
    ck.verify_checkpoint(path)
    fresh = _tiny_gpt2(ignored)
    loaded = ck.load_train_state(path, _state(fresh), fresh)
    for name, p in state.params.items():
        assert torch.equal(loaded.params[name], p), name
    for a, b in zip(ft.tree.leaves(loaded.opt_state), ft.tree.leaves(state.opt_state)):
        assert torch.equal(a, b)


def test_a_failed_background_write_fails_the_save_and_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", fail)
    model = Mixed()
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(str(tmp_path / "out"), 1, model=model, train_state=_state(model))
    assert os.listdir(tmp_path / "out") == []


def test_a_background_write_in_flight_is_not_hashed_as_a_library_file(tmp_path, monkeypatch):
    """safetensors writes ``.tmpXXXX`` and renames it: while the state file is written in the
    background, listing the folder for save_pretrained's files must not pick that name up (its
    hash job would open a file renamed away meanwhile)."""
    import threading

    listed, real_save, real_add_unlisted = threading.Event(), ck.save_file, ck.WrittenFiles.add_unlisted
    hashed = []

    def save_file_seen_in_flight(tensors, path, metadata=None):
        if os.path.basename(path) == ck.STATE_FILE:
            inflight = os.path.join(os.path.dirname(path), ".tmpInFlight")
            open(inflight, "wb").close()
            listed.wait(10)  # the main thread lists the folder now
            os.remove(inflight)
        real_save(tensors, path, metadata=metadata)

    def add_unlisted(self):
        real_add_unlisted(self)
        listed.set()

    real_entry = ck.file_entry
    monkeypatch.setattr(ck, "save_file", save_file_seen_in_flight)
    monkeypatch.setattr(ck.WrittenFiles, "add_unlisted", add_unlisted)
    monkeypatch.setattr(ck, "file_entry", lambda p, *a: hashed.append(os.path.basename(p)) or real_entry(p, *a))
    model = _tiny_gpt2()
    path = ck.save_checkpoint(str(tmp_path / "out"), 1, model=model, train_state=_state(model),
                              trainer_state=TrainerState(global_step=1))
    assert not [name for name in hashed if name.startswith(".")]
    assert ck.STATE_FILE in ck.read_manifest(path)["files"]
    ck.verify_checkpoint(path)
