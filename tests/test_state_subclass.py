"""TrainState.apply_gradients (Flax's shape) and subclasses that add fields (pytrees like the base)."""

import dataclasses

import pytest
import torch

import functrain as ft
from functrain.core.state import ConsumedStateError, TrainState, static_field
from functrain.io import checkpoint as ck


@dataclasses.dataclass(frozen=True, eq=False)
class EMAState(TrainState):
    ema: dict = dataclasses.field(default_factory=dict)
    decay: float = static_field(default=0.9)


def make(seed=0, tx=None):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    tx = tx or ft.optim.adamw(1e-2)
    base = TrainState.create(model, tx, seed=seed, copy=True)
    state = EMAState(**{f.name: getattr(base, f.name) for f in dataclasses.fields(TrainState)},
                     ema=ft.tree.clone(base.params))
    return model, tx, state


def test_subclass_fields_are_leaves_and_static_fields_are_structure():
    _, _, state = make()
    paths = ft.tree.paths(state)
    assert "ema.weight" in paths and "params.weight" in paths and not any(p.startswith("decay") for p in paths)
    doubled = ft.tree.map(lambda t: t * 2, state)
    assert type(doubled) is EMAState and doubled.decay == 0.9
    torch.testing.assert_close(doubled.ema["bias"], state.ema["bias"] * 2)
    assert ft.tree.structure(state) != ft.tree.structure(state.replace(decay=0.5))
    with pytest.raises(TypeError, match=r"EMAState has no field\(s\) \['emma'\]"):
        state.replace(emma={})


def test_subclass_checkpoints_and_stacks_like_the_base(tmp_path):
    _, _, state = make()
    state = state.replace(ema=ft.tree.map(lambda t: t + 1, state.ema))
    ck.save_tree_checkpoint(str(tmp_path), 3, state, {"global_step": 3})
    ck.verify_checkpoint(str(tmp_path / "checkpoint-3"))
    _, _, template = make(seed=1)
    loaded, progress = ck.load_tree(str(tmp_path / "checkpoint-3"), template)
    assert type(loaded) is EMAState and progress["global_step"] == 3
    assert ft.tree.tensors_equal(loaded, state)

    stacked = ft.stack_states([make(seed=0)[2], make(seed=1)[2]])
    assert type(stacked) is EMAState and stacked.ema["weight"].shape == (2, 3, 4)
    assert ft.tree.tensors_equal(ft.unstack_state(stacked)[1], make(seed=1)[2])


def test_a_consumed_subclass_state_raises_on_its_own_fields():
    _, _, state = make()
    state.mark_consumed("a test")
    with pytest.raises(ConsumedStateError, match="donated to a test"):
        state.ema
    with pytest.raises(ConsumedStateError):
        ft.tree.leaves(state)
    assert isinstance(state, EMAState) and state.consumed


def test_apply_gradients_matches_torch_adamw_over_steps():
    model, tx, state = make(tx=ft.optim.adamw(1e-2, weight_decay=0.1))
    state = state.replace(params=ft.tree.map(lambda p: p + 0.3, state.params))  # not the module's tensors
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in state.params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.randn(8, 3)

    def loss(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    step = torch.compile(lambda s: s.apply_gradients(grads=torch.func.grad(loss)(s.params), tx=tx,
                                                     ema=ft.tree.map(lambda e, p: 0.9 * e + 0.1 * p, s.ema, s.params)),
                         fullgraph=True, backend="eager")
    for _ in range(5):
        state = step(state)
        opt.zero_grad()
        loss(dict(ref)).backward()
        opt.step()
    assert type(state) is EMAState and int(state.step) == 5
    for k in ref:
        torch.testing.assert_close(state.params[k], ref[k].detach(), rtol=1e-6, atol=1e-7)
    assert not ft.tree.tensors_equal(state.ema, state.params)
