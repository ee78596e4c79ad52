"""Buffers a forward updates (BatchNorm running statistics) are outputs of the step.

The new state holds the updated buffers; the input state is untouched (unless donated); a
skipped fp16 step keeps the old ones; the same state and batch give bitwise the same new state.
Over an accumulation window, each microbatch's forward updates the statistics in turn, exactly as
a hand loop calling the module on the same microbatches does (docs/step.md).
"""

import pytest
import torch
from torch import nn

import functrain as ft
from functrain import population as P
from functrain.step.train import make_eval_step, make_train_step


class ConvBN(nn.Module):
    """A tiny ResNet-like classifier: conv, BatchNorm2d, pooling, BatchNorm1d, head."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x, labels=None):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        logits = self.head(torch.relu(self.bn1(self.fc(h))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _batch(i=0, n=8):
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(n, 2, 5, 5, generator=g) * 3 + 1, "labels": torch.randint(0, 3, (n,), generator=g)}


def _setup(**step_kw):
    torch.manual_seed(0)
    model = ConvBN()
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx, copy=True)
    return model, tx, state, make_train_step(model, tx, **step_kw)


def _stats(state):
    return {k: v for k, v in state.buffers.items() if "running" in k or "num_batches" in k}


def _hand_loop_buffers(state, batch, accumulate):
    """The module itself, loaded with the state, called on each microbatch in train mode."""
    torch.manual_seed(0)
    ref = ConvBN()
    ref.load_state_dict({**state.params, **state.buffers})
    ref.train()
    for mb in ft.step.batch.split(batch, accumulate):
        ref(**mb)
    return dict(ref.named_buffers())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_running_statistics_are_outputs_and_match_a_hand_loop(accumulate):
    model, _, state, step = _setup(accumulate=accumulate)
    state, _ = step(state, _batch(0))  # from a state that is no longer the module's
    before = ft.tree.clone((state.params, state.buffers))
    batch = _batch(1)
    new, _ = step(state, batch)
    again, _ = step(state, batch)
    assert ft.tree.tensors_equal(before, (state.params, state.buffers)), "the step wrote into its input state"
    assert ft.tree.tensors_equal(new.buffers, again.buffers)
    assert ft.tree.tensors_equal(new.buffers, _hand_loop_buffers(state, batch, accumulate))
    assert int(new.buffers["bn.num_batches_tracked"]) == int(state.buffers["bn.num_batches_tracked"]) + accumulate
    assert not ft.tree.tensors_equal(_stats(new), _stats(state))


def test_eval_step_leaves_the_statistics_alone_and_uses_them():
    model, _, state, step = _setup()
    state, _ = step(state, _batch(0))
    before = ft.tree.clone(state.buffers)
    out = make_eval_step(model, return_outputs=True)(state, _batch(1))
    assert ft.tree.tensors_equal(before, state.buffers)
    ref = ConvBN()
    ref.load_state_dict({**state.params, **state.buffers})
    with torch.no_grad():
        assert torch.equal(out["outputs"], ref.eval()(**_batch(1))["logits"])


def test_donated_step_writes_statistics_in_place():
    _, _, state, step = _setup()
    _, _, _, donating = _setup(donate=True)
    want, _ = step(state, _batch(0))
    ptrs = {k: v.data_ptr() for k, v in state.buffers.items()}
    got, _ = donating(state, _batch(0))
    assert ft.tree.tensors_equal(got.buffers, want.buffers)
    assert {k: v.data_ptr() for k, v in got.buffers.items()} == ptrs


def test_skipped_fp16_step_keeps_the_old_statistics():
    _, _, state, step = _setup(precision="fp16")
    bad = _batch(0)
    bad["x"][0, 0, 0, 0] = float("inf")  # non-finite gradients, as an fp16 overflow gives
    new, metrics = step(state, bad)
    assert bool(metrics["skipped"])
    assert ft.tree.tensors_equal(new.buffers, state.buffers)
    good, metrics = step(state, _batch(0))
    assert not bool(metrics["skipped"]) and not ft.tree.tensors_equal(_stats(good), _stats(state))


def test_compiled_step_matches_eager_and_leaves_its_input():
    torch._dynamo.reset()
    _, _, state, eager = _setup()
    _, _, _, compiled = _setup(compile=True)
    before = ft.tree.clone(state.buffers)
    got, _ = compiled(state, _batch(0))
    want, _ = eager(state, _batch(0))
    torch._dynamo.reset()
    assert ft.tree.tensors_equal(before, state.buffers)
    assert ft.tree.relative_difference(_stats(got), _stats(want)) <= 1e-6
    assert torch.equal(got.buffers["bn.num_batches_tracked"], want.buffers["bn.num_batches_tracked"])


def test_population_members_update_their_own_statistics():
    _, tx, state, step = _setup()
    other = state.replace(params=ft.tree.map(lambda p: p * 0.5, state.params))
    stacked = P.stack_states([state, other])
    before = ft.tree.clone(stacked.buffers)
    new, _ = P.make_population_train_step(ConvBN(), tx)(stacked, _batch(0))
    assert ft.tree.tensors_equal(before, stacked.buffers)
    for member, alone in zip(P.unstack_state(new, 2), (state, other)):
        want, _ = step(alone, _batch(0))
        assert ft.tree.relative_difference(_stats(member), _stats(want)) <= 1e-5
