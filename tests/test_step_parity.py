"""The step against a hand-written PyTorch loop: AdamW + clip_grad_norm_ + LambdaLR."""

import copy

import pytest
import torch

import functrain as ft
from functrain.step.train import make_train_step
from step_models import MLP, cls_batch, gpt2, lm_batch

STEPS, LR, WD, TOTAL = 20, 3e-3, 0.01, 25


def linear(count):
    return LR * (1.0 - count / TOTAL)  # works on Python ints (LambdaLR) and 0-d tensors (tx)


def _hand_loop(model, batches, max_norm):
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: linear(k) / LR)
    lrs, norms = [], []
    for batch in batches:
        opt.zero_grad()
        out = model(**batch)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return dict(model.named_parameters()), lrs, norms


@pytest.mark.parametrize("name,clip_in", [("mlp", "tx"), ("mlp", "step"),
                                          pytest.param("gpt2", "tx", marks=pytest.mark.slow)])
def test_matches_torch_adamw_clip_lambdalr(name, clip_in):
    torch.manual_seed(0)
    model, batches = (MLP(), [cls_batch(seed=i) for i in range(STEPS)]) if name == "mlp" else \
        (gpt2(dropout=0.0), [lm_batch(seed=i, pad_rows={i % 8: 3}) for i in range(STEPS)])
    max_norm = 0.5
    adamw = ft.optim.adamw(linear, weight_decay=WD)
    tx = ft.optim.chain(ft.optim.clip_by_global_norm(max_norm), adamw) if clip_in == "tx" else adamw
    step = make_train_step(model, tx, max_grad_norm=max_norm if clip_in == "step" else None)
    state = ft.TrainState.create(model, tx, copy=True)
    ref_params, ref_lrs, ref_norms = _hand_loop(model, batches, max_norm)
    lrs, norms = [], []
    for batch in batches:
        state, metrics = step(state, batch)
        lrs.append(float(metrics["learning_rate"]))
        norms.append(float(metrics["grad_norm"]))
    assert ft.tree.relative_difference(state.params, ref_params) <= 1e-5
    assert lrs == pytest.approx(ref_lrs, rel=1e-6)
    assert norms == pytest.approx([float(n) for n in ref_norms], rel=1e-4)
    assert any(n > max_norm for n in norms), "the test should exercise clipping"
    assert int(state.step) == STEPS
