"""Precision: fp16 dynamic loss scale against torch.amp.GradScaler; bf16 close to fp32.

The fp16 test runs on CPU with real fp16 autocast (supported on CPU in torch 2.13), for both the
reference loop and the step.
"""

import copy

import pytest
import torch

import functrain as ft
from functrain.core.precision import dynamic_scale_init, dynamic_scale_update
from functrain.step.train import make_train_step
from step_models import MLP, cls_batch, gpt2, lm_batch

OVERFLOW_STEPS = {2, 3, 9, 10, 11}
STEPS = 16


def _batches():
    batches = []
    for i in range(STEPS):
        b = cls_batch(seed=i)
        if i in OVERFLOW_STEPS:
            b["x"][1, 0] = float("inf")  # non-finite gradients, as an fp16 overflow gives
        batches.append(b)
    return batches


def _gradscaler_loop(model, batches, lr_fn):
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    scales, trackers, skipped = [], [], []
    for batch in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        found_inf = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        scaler.update()
        if not found_inf:
            sched.step()  # the schedule advances only on applied updates (as HF's Trainer)
        scales.append(scaler.get_scale())
        trackers.append(int(scaler._growth_tracker))
        skipped.append(bool(found_inf))
    return dict(model.named_parameters()), scales, trackers, skipped


def test_fp16_loss_scale_sequence_matches_gradscaler():
    torch.manual_seed(0)
    model = MLP()
    lr_fn = lambda k: 0.1 / (1 + k)  # noqa: E731 - schedule position matters: a skip must not advance it
    tx = ft.optim.sgd(lambda count: 0.1 / (1 + count))
    state = ft.TrainState.create(model, tx, copy=True, loss_scale=dynamic_scale_init(256.0, growth_interval=3))
    step = make_train_step(model, tx, precision="fp16")
    ref_params, ref_scales, ref_trackers, ref_skipped = _gradscaler_loop(model, _batches(), lr_fn)
    scales, trackers, skipped = [], [], []
    for batch in _batches():
        state, m = step(state, batch)
        scales.append(float(m["loss_scale"]))
        trackers.append(int(state.loss_scale.growth_tracker))
        skipped.append(bool(m["skipped"]))
    assert skipped == ref_skipped == [i in OVERFLOW_STEPS for i in range(STEPS)]
    assert scales == ref_scales and trackers == ref_trackers
    changes = [b / a for a, b in zip(scales, scales[1:])]
    assert 2.0 in changes and 0.5 in changes, "the run should see growth and backoff"
    assert int(state.step) == STEPS - len(OVERFLOW_STEPS)
    assert int(state.opt_state[-1].count) == STEPS - len(OVERFLOW_STEPS)  # schedule position
    assert ft.tree.relative_difference(state.params, ref_params) <= 1e-5


def test_skipped_step_changes_only_the_loss_scale():
    torch.manual_seed(0)
    model = MLP()
    tx = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, tx, copy=True)
    bad = _batches()[2]
    new, m = make_train_step(model, tx, precision="fp16")(state, bad)
    assert bool(m["skipped"])
    assert ft.tree.tensors_equal((new.params, new.opt_state, new.step), (state.params, state.opt_state, state.step))
    assert float(new.loss_scale.scale) == 32768.0 and int(new.loss_scale.growth_tracker) == 0


def test_dynamic_scale_update_matches_amp_update_scale():
    ds = dynamic_scale_init(8.0, growth_interval=2)
    scale, tracker = torch.tensor([8.0]), torch.tensor([0], dtype=torch.int32)
    for finite in [True, True, False, True, True, True, False, False, True]:
        ds = dynamic_scale_update(ds, torch.tensor(finite))
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0 if finite else 1.0]), 2.0, 0.5, 2)
        assert float(ds.scale) == float(scale) and int(ds.growth_tracker) == int(tracker)


def test_bf16_step_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = gpt2(dropout=0.0)
    tx = ft.optim.adamw(1e-3)
    state = ft.TrainState.create(model, tx, copy=True)
    runs = {}
    for precision in ["fp32", "bf16"]:
        step, s = make_train_step(model, tx, precision=precision), state
        losses = []
        for i in range(3):
            s, m = step(s, lm_batch(seed=i))
            losses.append(float(m["loss"]))
        runs[precision] = (s, losses)
    (s32, l32), (s16, l16) = runs["fp32"], runs["bf16"]
    assert all(p.dtype == torch.float32 for p in s16.params.values()), "master params stay fp32"
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert l16 != l32, "bf16 autocast should actually change the arithmetic"
    update32, update16 = ft.tree.sub(s32.params, state.params), ft.tree.sub(s16.params, state.params)
    assert ft.tree.relative_difference(update16, update32) < 0.1
