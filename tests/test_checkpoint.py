import json
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import functrain as ft
from functrain.io import checkpoint as ck
from functrain.trainer.callbacks import TrainerState
from functrain.trainer.args import TrainingArguments


class TiedNet(nn.Module):
    """Tied embedding/output weights, a buffer and a frozen parameter: the awkward cases."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("counter", torch.arange(4.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


def _trained_state(model, tx, steps=3):
    state = ft.TrainState.create(model, tx, seed=5, copy=True)
    for i in range(steps):
        grads = {n: torch.randn_like(p) for n, p in state.params.items()}
        updates, opt = tx.update(grads, state.opt_state, state.params)
        state = state.replace(params=ft.optim.apply_updates(state.params, updates), opt_state=opt,
                              step=state.step + 1, rng=ft.rng.next_key(state.rng))
    return state


def _sync(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state.params[n] if n in state.params else state.buffers[n])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model, tx = TiedNet(), ft.optim.adamw(1e-2)
    state = _trained_state(model, tx)
    _sync(model, state)
    args = TrainingArguments(str(tmp_path / "out"))
    ts = TrainerState(global_step=3, epoch=0.5, data_position={"epoch": 0, "batch_index": 6, "seed": 42})
    path = ck.save_checkpoint(args.output_dir, 3, model=model, train_state=state, trainer_state=ts, args=args)
    return path, model, tx, state


def test_round_trip_exact_types(saved):
    path, model, tx, state = saved
    assert os.path.basename(path) == "checkpoint-3"
    assert sorted(os.listdir(path)) == sorted([ck.MODEL_FILE, ck.STATE_FILE, ck.RNG_FILE, ck.TRAINER_STATE_FILE,
                                               ck.ARGS_FILE, ck.MANIFEST_FILE])
    ck.verify_checkpoint(path)
    template = ft.TrainState.create(TiedNet(), tx, seed=0, copy=True)
    loaded = ck.load_train_state(path, template, model)
    assert ft.tree.structure(loaded) == ft.tree.structure(state)
    assert ft.tree.tensors_equal(loaded, state)
    assert type(loaded.opt_state[0]) is type(state.opt_state[0])  # NamedTuples come back as such
    # tied weight written once, under the first name; optimizer state in its own file
    from safetensors import safe_open
    with safe_open(os.path.join(path, ck.MODEL_FILE), "pt") as f:
        assert "emb.weight" in f.keys() and "out.weight" not in f.keys() and "scratch" not in f.keys()
    with safe_open(os.path.join(path, ck.STATE_FILE), "pt") as f:
        keys = set(f.keys())
    assert "params.emb.weight" not in keys and "step" in keys and "rng" in keys
    assert "buffers.scratch" in keys  # non-persistent buffer is not in the model file
    assert TrainerState.load_from_json(os.path.join(path, ck.TRAINER_STATE_FILE)).data_position["batch_index"] == 6


def test_model_weights_load_into_fresh_model(saved):
    path, model, _, _ = saved
    fresh = TiedNet()
    ck.load_model_weights(fresh, path)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(x), model(x))
    assert fresh.out.weight is fresh.emb.weight


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1); np.random.seed(2); random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ck.write_rng_state(str(tmp_path))
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9); np.random.seed(9); random.seed(9)
    ck.load_rng_state(str(tmp_path))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model, tx = TiedNet(), ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(str(tmp_path), 1, model=model, train_state=state)
    assert os.listdir(tmp_path) == []  # neither checkpoint-1 nor the temporary folder


def test_resave_same_step_replaces(saved):
    path, model, tx, state = saved
    out = os.path.dirname(path)
    ck.save_checkpoint(out, 3, model=model, train_state=state, trainer_state=TrainerState(global_step=3))
    assert [os.path.basename(p) for _, p in ck.checkpoint_dirs(out)] == ["checkpoint-3"]
    assert sorted(os.listdir(out)) == ["checkpoint-3"]
    ck.verify_checkpoint(path)


# -- corrupt inputs ---------------------------------------------------------------------------------

def _corrupt(path, kind):
    target = os.path.join(path, ck.STATE_FILE)
    if kind == "truncated":
        data = open(target, "rb").read()
        open(target, "wb").write(data[: len(data) // 2])
    elif kind == "flipped":
        data = bytearray(open(target, "rb").read())
        data[len(data) - 3] ^= 0x01
        open(target, "wb").write(bytes(data))
    elif kind == "missing":
        os.remove(os.path.join(path, ck.MODEL_FILE))
    elif kind == "no_manifest":
        os.remove(os.path.join(path, ck.MANIFEST_FILE))
    elif kind == "bad_manifest":
        open(os.path.join(path, ck.MANIFEST_FILE), "w").write("{ not json")


@pytest.mark.parametrize("kind, match", [
    ("truncated", "train_state.safetensors.*bytes.*truncated"),
    ("flipped", "train_state.safetensors.*checksum \\(xxh3_128\\)"),
    ("missing", "missing 'model.safetensors'"),
    ("no_manifest", "no manifest.json"),
    ("bad_manifest", "manifest.json is unreadable"),
])
def test_corruption_detected(saved, kind, match, caplog):
    path, model, tx, _ = saved
    _corrupt(path, kind)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.verify_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        assert ck.find_resumable_checkpoint(os.path.dirname(path)) is None
    assert "skipping checkpoint-3" in caplog.text


class _Bomb:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "pytorch_model.bin", "scheduler.pkl"])
def test_planted_pickle_never_executed(saved, tmp_path, name, caplog):
    path, model, tx, state = saved
    marker = tmp_path / "PWNED"
    with open(os.path.join(path, name), "wb") as f:
        pickle.dump(_Bomb(str(marker)), f)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        assert ck.find_resumable_checkpoint(os.path.dirname(path)) == path
        ck.load_train_state(path, ft.TrainState.create(TiedNet(), tx, copy=True), model)
        ck.load_rng_state(path)
        ck.load_model_weights(TiedNet(), path)
    assert f"ignoring {name}" in caplog.text and "never loads pickle" in caplog.text
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_rejected(saved, tmp_path):
    path, model, tx, _ = saved
    marker = tmp_path / "PWNED"
    target = os.path.join(path, ck.STATE_FILE)
    with open(target, "wb") as f:
        pickle.dump(_Bomb(str(marker)), f)
    manifest = ck.read_manifest(path)  # an attacker who also fixes the manifest
    manifest["files"][ck.STATE_FILE] = ck.file_entry(target)
    json.dump(manifest, open(os.path.join(path, ck.MANIFEST_FILE), "w"))
    ck.verify_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors file"):
        ck.load_train_state(path, ft.TrainState.create(TiedNet(), tx, copy=True), model)
    assert not marker.exists()


def test_find_resumable_skips_bad_and_partial(saved, caplog):
    path, model, tx, state = saved
    out = os.path.dirname(path)
    ck.save_checkpoint(out, 5, model=model, train_state=state, trainer_state=TrainerState(global_step=5))
    ck.save_checkpoint(out, 7, model=model, train_state=state, trainer_state=TrainerState(global_step=7))
    _corrupt(os.path.join(out, "checkpoint-7"), "flipped")
    os.makedirs(os.path.join(out, "checkpoint-9"))  # an empty, half-made folder
    os.makedirs(os.path.join(out, ".tmp-checkpoint-11-abcd"))  # an interrupted write
    with caplog.at_level(logging.INFO, logger="functrain"):
        assert ck.find_resumable_checkpoint(out) == os.path.join(out, "checkpoint-5")
    assert "skipping checkpoint-9" in caplog.text and "skipping checkpoint-7" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-5" in caplog.text
    ck.remove_stale_temporaries(out)
    assert not os.path.exists(os.path.join(out, ".tmp-checkpoint-11-abcd"))


def test_wrong_model_is_clear_error(saved):
    path, _, _, _ = saved
    other = nn.Linear(3, 3)
    with pytest.raises(ck.CheckpointError, match="no tensor for 'params.bias'.*different model"):
        ck.load_train_state(path, ft.TrainState.create(other, ft.optim.adamw(1e-2)), other)


def test_save_only_model_is_not_resumable(tmp_path):
    model = TiedNet()
    path = ck.save_checkpoint(str(tmp_path), 2, model=model, train_state=None)
    ck.verify_checkpoint(path, require_resumable=False)
    with pytest.raises(ck.CheckpointError, match="save_only_model"):
        ck.verify_checkpoint(path)


@pytest.mark.parametrize("limit, best, expect", [
    (2, 2, [2, 10]),
    (3, 4, [4, 8, 10]),
    (1, 4, [4, 10]),       # the newest is kept for resume, the best is never deleted
    (2, None, [8, 10]),
    (2, 10, [8, 10]),
    (None, 2, [2, 4, 6, 8, 10]),
])
def test_rotation_keeps_best(tmp_path, limit, best, expect):
    model = nn.Linear(2, 2)
    for step in (2, 4, 6, 8, 10):
        ck.save_checkpoint(str(tmp_path), step, model=model)
    best_path = ck.checkpoint_path(str(tmp_path), best) if best else None
    ck.rotate_checkpoints(str(tmp_path), limit, best_path)
    assert [s for s, _ in ck.checkpoint_dirs(str(tmp_path))] == expect
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_transformers_model_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tx = ft.optim.adamw(1e-2)
    state = _trained_state(model, tx, steps=2)
    _sync(model, state)
    path = ck.save_checkpoint(str(tmp_path), 2, model=model, train_state=state, trainer_state=TrainerState())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    restored = ck.load_train_state(path, ft.TrainState.create(loaded, tx, copy=True), loaded)
    assert ft.tree.tensors_equal(restored, state)
