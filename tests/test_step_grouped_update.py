"""leafwise_update=True: a donated eager step updates a group of parameters at a time, in place,
with the same numbers as the pure whole-tree update (bitwise, >= 4 steps, from a state whose params
differ from the module's), and less memory alive at once."""

import pytest
import torch

import functrain as ft
from functrain.step import grouped_update
from functrain.step.train import make_train_step
from step_models import gpt2, lm_batch, moved_state

train_module = __import__("functrain.step.train", fromlist=["make_train_step"])


@pytest.fixture(autouse=True)
def grouped_path_for_adamw(monkeypatch):
    """A donated eager ``adamw`` goes through torch's fused kernel (tests/test_step_fused_adamw.py);
    these tests are about the grouped path, so they turn that off."""
    monkeypatch.setattr(train_module, "fused_adamw_of", lambda tx: None)

OPTIMIZERS = {
    "adamw_masked_decay": lambda m: ft.optim.adamw(ft.schedules.get_schedule("linear", 1e-2, num_training_steps=6,
                                                                              num_warmup_steps=2),
                                                   weight_decay=0.1, mask=ft.optim.default_weight_decay_mask(m)),
    "sgd_nesterov": lambda m: ft.optim.sgd(0.05, momentum=0.9, nesterov=True),
    "lion": lambda m: ft.optim.lion(1e-3, weight_decay=0.01),
    "rmsprop_centered": lambda m: ft.optim.rmsprop(1e-3, centered=True, momentum=0.5),
    "adagrad": lambda m: ft.optim.adagrad(1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grouped_donated_update_equals_pure_update_bitwise(name, monkeypatch):
    monkeypatch.setattr(grouped_update, "GROUPS", 5)  # several groups even for a tiny model
    torch.manual_seed(0)
    model = gpt2()
    tx = OPTIMIZERS[name](model)
    batches = [lm_batch(seed=i) for i in range(4)]
    pure_step = make_train_step(model, tx, max_grad_norm=0.5)
    grouped_step = make_train_step(model, tx, max_grad_norm=0.5, donate=True, leafwise_update=True)
    pure = moved_state(model, tx)
    grouped = ft.TrainState.create(model, tx, copy=True).replace(
        params={k: v.clone() for k, v in pure.params.items()})
    ptrs = [t.data_ptr() for t in ft.tree.leaves((grouped.params, grouped.opt_state))]
    for b in batches:
        pure, m_pure = pure_step(pure, b)
        grouped, m = grouped_step(grouped, b)
        for key in ("loss", "grad_norm", "learning_rate"):
            if key in m_pure:
                assert torch.equal(m[key], m_pure[key]), key
    assert len(grouped_update.parameter_groups(grouped.params)) > 1  # the patched GROUPS reached the step
    assert [t.data_ptr() for t in ft.tree.leaves((grouped.params, grouped.opt_state))] == ptrs  # in place
    assert ft.tree.tensors_equal(grouped.params, pure.params)
    assert ft.tree.tensors_equal(grouped.opt_state, pure.opt_state)
    assert int(grouped.step) == 4


def test_learning_rate_metric_is_not_the_state_tensor():
    torch.manual_seed(0)
    model = gpt2()
    tx = ft.optim.adamw(ft.schedules.get_schedule("linear", 1e-2, num_training_steps=4))
    step = make_train_step(model, tx, donate=True, leafwise_update=True)
    state = ft.TrainState.create(model, tx, copy=True)
    state, m1 = step(state, lm_batch(seed=0))
    first = float(m1["learning_rate"])
    state, _ = step(state, lm_batch(seed=1))
    assert float(m1["learning_rate"]) == first  # a later step does not rewrite an earlier metric


def test_parameter_groups_cover_every_name_once_in_order():
    params = {f"p{i}": torch.zeros(n) for i, n in enumerate([5, 100, 3, 3, 40, 1, 60])}
    groups = grouped_update.parameter_groups(params, 4)
    assert [n for g in groups for n in g] == list(params)
    assert len(groups) > 1 and all(g for g in groups)


def test_grouped_update_skips_a_non_finite_window_like_the_pure_step(monkeypatch):
    monkeypatch.setattr(grouped_update, "GROUPS", 5)
    torch.manual_seed(0)
    model = gpt2()
    tx = OPTIMIZERS["adamw_masked_decay"](model)

    def loss_fn(m, batch):  # the window's "factor" makes a chosen step's loss infinite
        out = m(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss * batch["factor"].mean()

    batches = []
    for i in range(4):
        b = lm_batch(seed=i)
        rows = b["input_ids"].shape[0]
        b["factor"] = torch.full((rows,), float("inf") if i == 1 else 1.0)
        batches.append(b)
    pure_step = make_train_step(model, tx, loss_fn, skip_non_finite=True)
    grouped_step = make_train_step(model, tx, loss_fn, skip_non_finite=True, donate=True, leafwise_update=True)
    pure = moved_state(model, tx)
    grouped = ft.TrainState.create(model, tx, copy=True).replace(
        params={k: v.clone() for k, v in pure.params.items()})
    skipped = []
    for b in batches:
        pure, m_pure = pure_step(pure, b)
        grouped, m = grouped_step(grouped, b)
        assert torch.equal(m["skipped"], m_pure["skipped"])
        skipped.append(bool(m["skipped"]))
    assert skipped == [False, True, False, False]
    assert ft.tree.tensors_equal(grouped.params, pure.params)
    assert ft.tree.tensors_equal(grouped.opt_state, pure.opt_state)
    assert int(grouped.step) == int(pure.step) == 3
