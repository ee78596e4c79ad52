"""Each script in examples/ run with tiny settings, asserting on what it produced (metrics, files,
printed output), not only that it exited."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- hand_loop.py: the research-style loop over make_train_step / make_eval_step ------------------


def test_hand_loop_learns_the_counting_language(capsys):
    hand_loop = load_example("hand_loop")
    out = hand_loop.main(["--steps", "30", "--batch-size", "8", "--seq-len", "16", "--lr", "5e-3", "--log-every", "10"])
    losses = [loss for _, loss in out["logged"]]
    assert [step for step, _ in out["logged"]] == [1, 10, 20, 30]
    assert int(out["state"].step) == 30
    assert losses[0] > 0.8 * math.log(hand_loop.VOCAB)  # starts near chance
    assert losses[-1] < 0.5 * losses[0]
    assert out["eval_loss"] < 0.5 * math.log(hand_loop.VOCAB)
    assert f"eval loss {out['eval_loss']:.4f}" in capsys.readouterr().out


def test_unit_test_of_a_step_in_three_lines():
    """The design notes' sketch: build a state, call the step twice on the same batch, compare."""
    hand_loop = load_example("hand_loop")
    model = hand_loop.make_model(seq_len=8)
    tx = hand_loop.make_optimizer(lr=1e-2, total_steps=10, warmup=1)
    train_step = ft.make_train_step(model, tx)
    batch = hand_loop.make_batch(torch.Generator().manual_seed(0), batch_size=4, seq_len=8)

    state = ft.TrainState.create(model, tx, seed=0, copy=True)
    before = {k: v.clone() for k, v in state.params.items()}
    s1, m1 = train_step(state, batch)
    s2, m2 = train_step(state, batch)

    # Pure: the same inputs give bitwise the same outputs (params, optimizer state, step, rng key,
    # metrics), and the input state is untouched.
    assert ft.tree.tensors_equal((s1, m1), (s2, m2))
    assert ft.tree.tensors_equal(state.params, before)
    assert not ft.tree.tensors_equal(s1.params, before)
    assert int(s1.step) == 1 and int(state.step) == 0
    # And it is a training step: the loss on that batch went down.
    _, m3 = train_step(s1, batch)
    assert float(m3["loss"]) < float(m1["loss"])
