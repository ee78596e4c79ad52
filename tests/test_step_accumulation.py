"""Accumulation normalizes by the supervised items of the whole window (HF's fixed behaviour)."""

import pytest
import torch

import functrain as ft
from functrain.step.batch import make_count_items
from functrain.step.train import make_train_step
from step_models import TinyGPTForCausalLM, gpt2, lm_batch

# Uneven padding: rows in different microbatches (2 rows each) carry very different label counts.
PADS = {0: 12, 1: 14, 2: 1, 5: 15, 6: 8, 7: 13}


def _sgd_grads(model, batch, accumulate):
    """With SGD(lr=1) the update is minus the gradient."""
    tx = ft.optim.sgd(1.0)
    state = ft.TrainState.create(model, tx, copy=True)
    new, metrics = make_train_step(model, tx, accumulate=accumulate)(state, batch)
    return ft.tree.sub(state.params, new.params), metrics


def _relative(a, b):
    return ft.tree.relative_difference(a, b)


@pytest.mark.parametrize("make_model", [gpt2, TinyGPTForCausalLM], ids=["gpt2", "tiny_gpt"])
def test_four_microbatches_equal_the_full_batch(make_model):
    torch.manual_seed(0)
    model = make_model(dropout=0.0)
    batch = lm_batch(n=8, t=16, pad_rows=PADS)
    full, m_full = _sgd_grads(model, batch, 1)
    acc, m_acc = _sgd_grads(model, batch, 4)
    assert _relative(acc, full) <= 1e-5
    assert torch.allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
    assert int(m_acc["num_items"]) == int(m_full["num_items"]) == sum(15 - min(p, 15) for p in
                                                                     [PADS.get(r, 0) for r in range(8)])

    # The naive average of per-microbatch means is measurably different: the test can fail.
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    naive = None
    for mb in micro:
        g, _ = _sgd_grads(model, mb, 1)
        naive = g if naive is None else ft.tree.add(naive, g)
    naive = ft.tree.scale(naive, 0.25)
    assert _relative(naive, full) > 1e-2


def test_matches_hf_trainer_num_items_in_batch():
    """HF's fixed Trainer: loss_k = sum_k / num_items_in_batch (labels[..., 1:] != -100 over the
    window) passed to the model, gradients summed over microbatches."""
    torch.manual_seed(0)
    model = gpt2(dropout=0.0)
    batch = lm_batch(n=8, t=16, pad_rows=PADS)
    ours, _ = _sgd_grads(model, batch, 4)
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    num_items = sum(mb["labels"][..., 1:].ne(-100).sum() for mb in micro)
    model.zero_grad()
    for mb in micro:
        model(**mb, num_items_in_batch=num_items).loss.backward()
    hf = {n: p.grad for n, p in model.named_parameters()}
    assert _relative(ours, hf) <= 1e-5


def test_microbatch_without_items_contributes_nothing():
    torch.manual_seed(0)
    model = TinyGPTForCausalLM(dropout=0.0)
    batch = lm_batch(n=4, t=8)
    batch["labels"][2:] = -100  # second microbatch has no supervised token
    acc, m = _sgd_grads(model, batch, 2)
    first, _ = _sgd_grads(model, {k: v[:2] for k, v in batch.items()}, 1)
    assert torch.isfinite(m["loss"]) and _relative(acc, first) <= 1e-6


def test_default_count_items_follows_hf_rules():
    lm, bert_like = make_count_items(gpt2()), make_count_items(torch.nn.Linear(2, 2))
    labels = torch.tensor([[1, 2, -100, 3], [-100, 5, 6, -100]])
    assert int(lm({"labels": labels})) == 4  # labels[..., 1:]: [2,-100,3] and [5,6,-100]
    assert int(bert_like({"labels": labels})) == 5
    assert int(lm({"labels": labels, "shift_labels": labels})) == 5  # shift_labels used as given
    assert int(bert_like({"labels": torch.tensor([0, 2, 1])})) == 3
    assert int(bert_like({"x": torch.zeros(6, 2)})) == 6  # no labels: examples
