"""Population-based training: exploit_and_explore over a stacked state (pure, reproducible)."""

import pytest
import torch

import functrain as ft
from functrain import optim, population as P
from functrain.core import rng
from functrain.step import pbt
from tests.step_models import MLP

W = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


def _data(n, g):
    x = torch.randn(n, 8, generator=g)
    return {"x": x, "labels": (x @ W).argmax(-1)}


def _population(lrs, seeds=None):
    hps = [dict(learning_rate=lr, weight_decay=0.01) for lr in lrs]
    return P.create_population(MLP, optim.inject_hyperparams(optim.adamw), hps, seeds=seeds or list(range(len(lrs))))


def _trained(lrs, steps=3):
    state, tx = _population(lrs)
    step = P.make_population_train_step(MLP(), tx)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        state, _ = step(state, _data(16, g))
    return state


def test_bottom_members_copy_top_members_and_perturb_their_hyperparameters():
    state = _trained([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3])
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.8, 0.2, 0.4, 0.7])  # best: 1, 5; worst: 2, 4
    new, decision = pbt.exploit_and_explore(state, scores, rng.key(3), fraction=0.25, perturb=(0.5, 2.0),
                                            explore=("learning_rate", "weight_decay"))
    sources = decision.sources.tolist()
    assert set(decision.copies()) == {2, 4} and set(decision.copies().values()) <= {1, 5}
    old_lr = pbt.injected_hyperparams(state.opt_state)["learning_rate"]
    new_lr = pbt.injected_hyperparams(new.opt_state)["learning_rate"]
    for i, src in enumerate(sources):
        # Parameters and optimizer moments are the source's, bit for bit.
        for name in state.params:
            assert torch.equal(new.params[name][i], state.params[name][src])
        assert torch.equal(new.opt_state.inner_state[0].mu["fc1.weight"][i],
                           state.opt_state.inner_state[0].mu["fc1.weight"][src])
        factor = decision.factors["learning_rate"][i].item()
        assert factor == 1.0 if i == src else factor in (0.5, 2.0)
        assert new_lr[i].item() == pytest.approx(old_lr[src].item() * factor, rel=1e-6)
    # Shared buffers (one set for all members) are left as they are.
    shared = state.replace(buffers={"table": torch.arange(8.0)})
    assert torch.equal(pbt.exploit_and_explore(shared, scores, rng.key(3), buffers="shared")[0].buffers["table"],
                       torch.arange(8.0))
    # Each member keeps its own step count and random key.
    assert torch.equal(new.step, state.step) and torch.equal(new.rng, state.rng)
    # The input state is untouched (pure function).
    assert torch.equal(pbt.injected_hyperparams(state.opt_state)["learning_rate"], old_lr)


def test_same_key_same_decision_and_nan_ranks_last():
    state = _trained([1e-3, 2e-3, 3e-3, 4e-3], steps=1)
    scores = torch.tensor([0.2, float("nan"), 0.1, 0.3])
    a = pbt.exploit_and_explore(state, scores, rng.key(7))[1]
    b = pbt.exploit_and_explore(state, scores, rng.key(7))[1]
    assert torch.equal(a.sources, b.sources) and torch.equal(a.factors["learning_rate"], b.factors["learning_rate"])
    assert a.copies() == {1: 2}  # the NaN member is the worst, member 2 (0.1) the best
    # The key decides the factors: some other key draws other ones.
    others = [pbt.exploit_and_explore(state, scores, rng.key(k))[1].factors["learning_rate"] for k in range(8)]
    assert any(not torch.equal(f, a.factors["learning_rate"]) for f in others)
    acc = pbt.exploit_and_explore(state, torch.tensor([0.2, 0.9, 0.1, 0.3]), rng.key(7), greater_is_better=True)[1]
    assert acc.copies() == {2: 1}


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=torch.zeros(3)), r"shape \(4,\)"),
    (dict(explore=("momentum",)), "cannot explore \\['momentum'\\]"),
    (dict(fraction=0.75), "fraction must be in"),
    (dict(perturb=(0.0,)), "positive factors"),
])
def test_bad_arguments_are_named(kwargs, match):
    state = _trained([1e-3, 2e-3, 3e-3, 4e-3], steps=0)
    args = dict(scores=torch.zeros(4), key=rng.key(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pbt.exploit_and_explore(state, **args)


def _run(lrs, use_pbt, steps=60, interval=6, seed=0):
    g = torch.Generator().manual_seed(1)
    train = [_data(32, g) for _ in range(steps)]
    held_out = _data(512, g)
    state, tx = _population(lrs, seeds=[0] * len(lrs))
    step, evaluate = P.make_population_train_step(MLP(), tx), P.make_population_eval_step(MLP())
    key, schedule = rng.key(seed), []
    for i, batch in enumerate(train):
        state, _ = step(state, batch)
        if use_pbt and (i + 1) % interval == 0:
            key = rng.next_key(key)
            state, decision = pbt.exploit_and_explore(state, evaluate(state, held_out)["loss"], key,
                                                      perturb=(0.5, 2.0))
            schedule.append(decision.copies())
    return evaluate(state, held_out)["loss"], schedule


@pytest.mark.slow
def test_pbt_beats_the_best_fixed_member_with_a_bad_learning_rate_spread():
    lrs = [1e-5, 3e-5, 1e-4, 3e-4]  # all far too small for this task
    fixed, _ = _run(lrs, use_pbt=False)
    with_pbt, schedule = _run(lrs, use_pbt=True)
    # Same compute (N members x 60 steps); PBT's best member beats the best fixed one clearly.
    assert with_pbt.min() < 0.8 * fixed.min(), (with_pbt, fixed)
    assert any(schedule)
    again, schedule_again = _run(lrs, use_pbt=True)
    assert schedule_again == schedule and torch.equal(again, with_pbt)
