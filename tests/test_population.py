"""Populations: one vmapped step over N stacked states equals N ordinary runs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import optim, population as P, schedules
from tests.step_models import MLP

N = 8


def _batches(n, size=8, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (lead, size) if lead else (size,)
    return [{"x": torch.randn(*shape, 8, generator=g), "labels": torch.randint(0, 4, shape, generator=g)}
            for _ in range(n)]


def _population(hps, seeds, dropout=0.0):
    txf = optim.inject_hyperparams(optim.adamw)
    return P.create_population(lambda: MLP(dropout=dropout), txf, hps, seeds=seeds)


def _members_by_hand(hps, seeds, dropout=0.0):
    """The same N members built one by one (what create_population promises)."""
    txf = optim.inject_hyperparams(optim.adamw)
    out = []
    for hp, seed in zip(hps, seeds):
        torch.manual_seed(seed)
        out.append(ft.TrainState.create(MLP(dropout=dropout), txf(**hp), seed=seed, copy=True))
    return out


HPS = [dict(learning_rate=1e-3 * (i + 1), weight_decay=0.01 * i, b1=0.9 - 0.01 * i) for i in range(N)]
SEEDS = list(range(10, 10 + N))


def test_population_of_8_equals_8_separate_runs():
    stacked, tx = _population(HPS, SEEDS)
    pop_step = P.make_population_train_step(MLP(), tx, max_grad_norm=1.0)
    batches = _batches(20)
    for b in batches:
        stacked, pop_metrics = pop_step(stacked, b)
    assert stacked.step.tolist() == [20] * N
    members = P.unstack_state(stacked, N)
    for i, state in enumerate(_members_by_hand(HPS, SEEDS)):
        # The ordinary step (torch.autograd.grad, foreach ops), with member i's own optimizer.
        step = ft.make_train_step(MLP(), optim.inject_hyperparams(optim.adamw)(**HPS[i]),
                                  max_grad_norm=1.0)
        for b in batches:
            state, metrics = step(state, b)
        assert ft.tree.relative_difference(members[i].params, state.params) < 1e-5, i
        assert ft.tree.relative_difference(members[i].opt_state, state.opt_state) < 1e-5, i
        assert torch.allclose(pop_metrics["loss"][i], metrics["loss"], rtol=1e-5)
        assert torch.allclose(pop_metrics["learning_rate"][i], metrics["learning_rate"])
        assert torch.equal(members[i].rng, state.rng)
    # Members really differ (different seeds and learning rates).
    assert not torch.allclose(members[0].params["fc1.weight"], members[1].params["fc1.weight"])


def test_per_member_batches_with_uneven_label_counts():
    hps, seeds = HPS[:3], SEEDS[:3]
    stacked, tx = _population(hps, seeds)
    pop_step = P.make_population_train_step(MLP(), tx, in_dims="per_member", accumulate=2)
    batches = _batches(3, lead=3, seed=5)
    for b in batches:  # ignored labels make the microbatch item counts uneven
        b["labels"][:, :3] = -100
        b["labels"][1, 4:7] = -100
    for b in batches:
        stacked, m = pop_step(stacked, b)
    for i, state in enumerate(_members_by_hand(hps, seeds)):
        step = ft.make_train_step(MLP(), optim.inject_hyperparams(optim.adamw)(**hps[i]), accumulate=2)
        for b in batches:
            state, mi = step(state, {k: v[i] for k, v in b.items()})
        assert ft.tree.relative_difference(P.unstack_state(stacked)[i].params, state.params) < 1e-5
        assert int(m["num_items"][i]) == int(mi["num_items"])


def test_stack_unstack_round_trip_is_exact():
    states = _members_by_hand(HPS[:3], SEEDS[:3])
    stacked = P.stack_states(states)
    assert stacked.params["fc1.weight"].shape == (3, 16, 8)
    assert stacked.rng.shape == (3, 2)
    assert P.population_size(stacked) == 3
    back = P.unstack_state(stacked, 3)
    for a, b in zip(states, back):
        assert ft.tree.tensors_equal(a, b)
    with pytest.raises(P.PopulationError, match="asked for 4 members, the state holds 3"):
        P.unstack_state(stacked, 4)


def test_dropout_differs_per_member_and_is_deterministic():
    hps = [dict(learning_rate=1e-2)] * 4
    stacked, tx = _population(hps, [0] * 4, dropout=0.5)  # same init, same lr: only dropout differs
    stacked = stacked.replace(rng=torch.stack([ft.rng.key(s) for s in range(4)]))
    pop_step = P.make_population_train_step(MLP(dropout=0.5), tx)
    b = _batches(1)[0]
    out1, m1 = pop_step(stacked, b)
    out2, m2 = pop_step(stacked, b)
    assert torch.equal(m1["loss"], m2["loss"])  # a pure function of (state, batch)
    assert ft.tree.tensors_equal(out1.params, out2.params)
    assert len(set(m1["loss"].tolist())) == 4  # each member drew its own masks


def test_population_eval_equals_eval_step_per_member():
    stacked, _ = _population(HPS[:4], SEEDS[:4])
    b = _batches(1, size=6)[0]
    out = P.make_population_eval_step(MLP(), return_outputs=True)(stacked, b)
    eval_step = ft.make_eval_step(MLP(), return_outputs=True)
    for i, s in enumerate(P.unstack_state(stacked)):
        ref = eval_step(s, b)
        assert torch.allclose(out["loss"][i], ref["loss"], rtol=1e-6)
        assert torch.allclose(out["outputs"][i], ref["outputs"], rtol=1e-6, atol=1e-7)


def test_warmup_length_varies_as_a_tensor():
    ref = schedules.linear(1e-3, num_warmup_steps=5, num_training_steps=20)
    sched = P.warmup_linear(1e-3, torch.tensor(5.0), torch.tensor(20.0))
    for s in (0, 3, 5, 12, 20, 25):
        assert abs(float(sched(torch.tensor(s))) - ref(s)) < 1e-9

    def factory(learning_rate, num_warmup_steps):
        return optim.adamw(P.warmup_linear(learning_rate, num_warmup_steps, 10))

    txf = optim.inject_hyperparams(factory)
    hps = [dict(learning_rate=1e-2, num_warmup_steps=w) for w in (0, 3, 6)]
    stacked, tx = P.create_population(MLP, txf, hps, seeds=[0, 0, 0])
    pop_step = P.make_population_train_step(MLP(), tx)
    for b in _batches(4):
        stacked, m = pop_step(stacked, b)
    expected = [schedules.linear(1e-2, w, 10)(3) for w in (0, 3, 6)]  # the 4th update's rate
    adam, _, scale = stacked.opt_state.inner_state
    assert torch.allclose(scale.learning_rate, torch.tensor(expected), rtol=1e-6)


# -- errors -------------------------------------------------------------------------------------


def test_different_widths_name_the_leaf_and_shapes():
    a = ft.TrainState.create(MLP(hidden=16), optim.adamw(1e-3), copy=True)
    b = ft.TrainState.create(MLP(hidden=32), optim.adamw(1e-3), copy=True)
    with pytest.raises(P.PopulationError, match=r"params\.fc1\.bias.*\(16,\).*\(32,\).*width"):
        P.stack_states([a, b])


def test_different_structure_names_the_missing_leaf():
    a = ft.TrainState.create(MLP(), optim.adamw(1e-3), copy=True)
    b = ft.TrainState.create(MLP(), optim.sgd(1e-3), copy=True)
    with pytest.raises(P.PopulationError, match="different state structure"):
        P.stack_states([a, b])


def test_static_hyperparameter_that_varies_is_rejected():
    def factory(learning_rate, nesterov):
        return optim.sgd(learning_rate, momentum=0.9, nesterov=nesterov)

    txf = optim.inject_hyperparams(factory)
    with pytest.raises(P.PopulationError, match=r"\['nesterov'\] differ between members"):
        P.create_population(MLP, txf, [dict(learning_rate=0.1, nesterov=True), dict(learning_rate=0.1, nesterov=False)])


class HostBranching(nn.Module):
    """A model with a data-dependent Python branch: vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        if logits.sum() > 0:  # .item() under vmap
            logits = logits * 2
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_model_with_ops_vmap_cannot_batch_gets_a_clear_error():
    states = [ft.TrainState.create(HostBranching(), optim.sgd(0.1), copy=True) for _ in range(2)]
    stacked = P.stack_states(states)
    pop_step = P.make_population_train_step(HostBranching(), optim.sgd(0.1))
    before = ft.tree.clone(stacked.params)
    with pytest.raises(P.PopulationError, match=r"HostBranching cannot be trained as a vmapped population: data-dependent control flow "
                                                r".* at test_population\.py:\d+ in forward: `if logits\.sum\(\) > 0:.*`, in the "
                                                r"step of members 0\.\.1 .*sequential"):
        pop_step(stacked, _batches(1)[0])
    assert ft.tree.tensors_equal(before, stacked.params)


def test_per_member_batch_needs_a_member_dim():
    stacked, tx = _population(HPS[:2], SEEDS[:2])
    pop_step = P.make_population_train_step(MLP(), tx, in_dims="per_member")
    with pytest.raises(ValueError, match=r"leading dim of size 2"):
        pop_step(stacked, _batches(1, lead=3)[0])
    with pytest.raises(ValueError, match="in_dims must be"):
        P.make_population_train_step(MLP(), tx, in_dims=1)
    with pytest.raises(P.PopulationError, match="not stacked"):
        pop_step(P.unstack_state(stacked)[0], _batches(1, lead=2)[0])
