"""Activation checkpointing inside the pure step: same gradients, reentrant form rejected."""

import pytest
import torch

import functrain as ft
from functrain.step.recompute import checkpoint_modules, uncheckpoint_modules
from functrain.step.train import make_train_step
from step_models import Block, TinyGPTForCausalLM, gpt2, lm_batch


def _update(model, compile_=False, accumulate=2):
    tx = ft.optim.sgd(1.0)
    state = ft.TrainState.create(model, tx, copy=True)
    kw = {"compile": True, "compile_kwargs": {"backend": "aot_eager"}} if compile_ else {}
    new, _ = make_train_step(model, tx, accumulate=accumulate, **kw)(state, lm_batch(pad_rows={3: 4}))
    return ft.tree.sub(state.params, new.params)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_transformers_gradient_checkpointing(compile_):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt2(dropout=0.0)
    ref = _update(model)
    model.gradient_checkpointing_enable()  # transformers 5: use_reentrant=False by default
    assert model.transformer.gradient_checkpointing
    # Compiled, each microbatch's forward is compiled (with its backward): accumulation works too.
    assert ft.tree.relative_difference(_update(model, compile_, accumulate=2), ref) <= 1e-6


def _steps_with_dropout(model, steps=4, **kw):
    """``steps`` AdamW steps from a state moved away from the module's own tensors, dropout on."""
    tx = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, tx, copy=True, seed=7)
    state = state.replace(params=ft.tree.map(lambda p: p + 0.01, state.params))
    step = make_train_step(model, tx, accumulate=2, max_grad_norm=1.0, **kw)
    losses = []
    for i in range(steps):
        state, m = step(state, lm_batch(seed=i, pad_rows={3: 4}))
        losses.append(m["loss"].item())
    return state, losses


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_compiled_checkpointing_with_dropout_and_accumulation_matches_eager():
    """torch 2.13 cannot compile checkpointed regions with dropout inside one forward-loss-backward
    graph (it raised in inductor's remat pass); the forward is compiled per microbatch instead.
    With inductor drawing its random numbers through aten (``fallback_random``), the dropout masks
    are eager's, so the compiled, checkpointed run must give the eager run's numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt2(dropout=0.1)
    ref, ref_losses = _steps_with_dropout(model)
    model.gradient_checkpointing_enable()
    with torch._inductor.config.patch(fallback_random=True):
        got, losses = _steps_with_dropout(model, compile=True)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert ft.tree.relative_difference(got.params, ref.params) <= 1e-5
    assert ft.tree.relative_difference(got.opt_state, ref.opt_state) <= 1e-5
    # Dropout really was on: another seed gives other numbers.
    model.gradient_checkpointing_disable()
    tx = ft.optim.adamw(1e-2)
    other = ft.TrainState.create(model, tx, copy=True, seed=8)
    other = other.replace(params=ft.tree.map(lambda p: p + 0.01, other.params))
    _, m = make_train_step(model, tx, accumulate=2, max_grad_norm=1.0)(other, lm_batch(seed=0, pad_rows={3: 4}))
    assert m["loss"].item() != pytest.approx(ref_losses[0], rel=1e-6)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_reentrant_checkpointing_is_rejected():
    model = gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        make_train_step(model, ft.optim.sgd(0.1))


def test_checkpoint_modules_on_a_plain_model():
    torch.manual_seed(0)
    model = TinyGPTForCausalLM(layers=2, dropout=0.0)
    ref = _update(model)
    assert checkpoint_modules(model, Block) == ["blocks.0", "blocks.1"]
    # The checkpoint really is in the forward: the wrapped forward calls torch.utils.checkpoint.
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        got = _update(model)
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert len(calls) == 4 and all(k["use_reentrant"] is False for k in calls)  # 2 blocks x 2 microbatches
    assert ft.tree.relative_difference(got, ref) <= 1e-6
    uncheckpoint_modules(model)
    assert "forward" not in vars(model.blocks[0])
    with pytest.raises(ValueError, match="no submodule"):
        checkpoint_modules(model, lambda name, m: False)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_recomputation_uses_the_states_params_not_the_modules():
    # The backward's recomputation must see the state's tensors (bound by functional_call), not the
    # module's own: a state that has trained differs from the module it was created from.
    torch.manual_seed(0)
    model = gpt2(dropout=0.0)
    tx = ft.optim.sgd(1.0)
    state = ft.TrainState.create(model, tx, copy=True)
    state = state.replace(params={k: v + 0.05 * torch.randn_like(v) for k, v in state.params.items()})
    batch = lm_batch()
    ref, _ = make_train_step(model, tx)(state, batch)
    model.gradient_checkpointing_enable()
    got, _ = make_train_step(model, tx)(state, batch)
    assert ft.tree.relative_difference(ft.tree.sub(state.params, got.params),
                                       ft.tree.sub(state.params, ref.params)) <= 1e-6
