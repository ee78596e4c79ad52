"""The building blocks of a step, each usable by a hand loop: a step composed from them equals
make_train_step bitwise (accumulation, clipping, fp16 loss-scale bookkeeping with a skipped step,
dropout), and make_grad_fn returns updated buffers without touching its inputs."""

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.core.precision import dynamic_scale_init
from functrain.step import apply_update, keep_if_finite, make_grad_fn, unscale_grads
from tests.step_models import MLP


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batches(n=4, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 4, (rows,), generator=g)
        labels[torch.rand(rows, generator=g) < 0.3] = -100
        out.append({"x": torch.randn(rows, 8, generator=g), "labels": labels})
    out[0]["labels"][:rows // 2] = -100  # a microbatch without items
    return out


def fresh(model, tx, loss_scale=None):
    state = ft.TrainState.create(model, tx, seed=3, copy=True, loss_scale=loss_scale)
    return state.replace(params=ft.tree.map(lambda p: p * 1.5 + 0.01, state.params))  # not the module's tensors


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_hand_step_from_the_blocks_equals_make_train_step(precision):
    torch.manual_seed(0)
    model = MLP(dropout=0.2)
    tx = ft.optim.adamw(ft.schedules.warmup_cosine(peak=1e-2, warmup=2, total=10), weight_decay=0.1)
    grad_fn = make_grad_fn(model, accumulate=2, precision=precision)
    # fp16: a first scale so large the gradients overflow (that step is skipped, the scale backs off).
    scale = dynamic_scale_init(init_scale=2.0 ** 20) if precision == "fp16" else None

    def hand_step(state, batch):
        with ft.rng.seeded(state.rng), torch.random.fork_rng(devices=[]):
            model.train()
            ls = state.loss_scale
            g = grad_fn(state.params, state.buffers, batch, ls.scale if ls is not None else None)
            grads = g.grads
            if ls is not None:
                grads, finite = unscale_grads(grads, ls)
            params, opt_state, grad_norm = apply_update(tx, state.params, state.opt_state, grads, max_grad_norm=1.0)
            step = state.step + 1
            if ls is not None:
                (params, opt_state, step), ls = keep_if_finite(finite, (params, opt_state, step),
                                                               (state.params, state.opt_state, state.step), ls)
        return state.replace(params=params, opt_state=opt_state, step=step, loss_scale=ls,
                             rng=ft.rng.next_key(state.rng)), {"loss": g.loss, "grad_norm": grad_norm}

    library = ft.make_train_step(model, tx, accumulate=2, precision=precision, max_grad_norm=1.0)
    a, b = fresh(model, tx, scale), fresh(model, tx, scale)
    for i, batch in enumerate(batches()):
        a, ma = hand_step(a, batch)
        b, mb = library(b, batch)
        for k in ("loss", "grad_norm"):  # bitwise (the skipped fp16 step has a NaN norm in both)
            torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} at step {i}")
    assert ft.tree.tensors_equal((a.params, a.opt_state, a.step, a.rng), (b.params, b.opt_state, b.step, b.rng))
    if precision == "fp16":
        assert 0 < int(a.step) < 4 and float(a.loss_scale.scale) < 2.0 ** 20  # skipped and applied steps
        assert ft.tree.tensors_equal(a.loss_scale, b.loss_scale)


def test_grad_fn_returns_updated_buffers_and_leaves_its_inputs_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    state = ft.TrainState.create(model, ft.optim.sgd(0.1), copy=True)
    before = ft.tree.clone(state.buffers)
    grad_fn = make_grad_fn(model, lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]), accumulate=2)
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 1)}
    g = grad_fn(state.params, state.buffers, batch)
    assert ft.tree.tensors_equal(state.buffers, before)  # inputs untouched
    assert int(g.buffers["1.num_batches_tracked"]) == 2  # one update per microbatch
    assert not torch.equal(g.buffers["1.running_mean"], before["1.running_mean"])
    # The same as the module's own BatchNorm after the same two forwards.
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    ref.load_state_dict({**state.params, **state.buffers})
    for half in batch["x"].chunk(2):
        ref(half)
    torch.testing.assert_close(g.buffers["1.running_mean"], ref[1].running_mean)
    torch.testing.assert_close(g.buffers["1.running_var"], ref[1].running_var)


def test_grad_fn_weights_microbatches_by_items_and_autograd_equals_func():
    torch.manual_seed(0)
    model = MLP()
    state = fresh(model, ft.optim.sgd(0.1))
    batch = batches(1, rows=8)[0]
    whole = make_grad_fn(model)(state.params, state.buffers, batch)
    for differentiate in ("autograd", "func"):
        split = make_grad_fn(model, accumulate=4, differentiate=differentiate)(state.params, state.buffers, batch)
        assert ft.tree.relative_difference(split.grads, whole.grads) < 1e-6
        torch.testing.assert_close(split.loss, whole.loss)
        assert int(split.num_items) == int((batch["labels"] != -100).sum())
    with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
        make_grad_fn(model, accumulate=0)
