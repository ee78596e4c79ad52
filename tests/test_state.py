"""TrainState: immutability, create() from a real transformers model, pytree round trips, donation."""

import dataclasses

import pytest
import torch
import transformers
from torch.func import functional_call

import functrain as ft
from functrain import tree
from functrain.core.optim.base import EmptyState
from functrain.core.optim.transforms import ScaleByAdamState, ScaleByLearningRateState
from functrain.core.state import ConsumedStateError, TrainState

TIED = ("transformer.wte.weight", "lm_head.weight")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def input_ids(seed=1):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits_of(model, state, ids):
    return functional_call(model, {**state.params, **state.buffers}, (ids,)).logits


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture
def state(model):
    return TrainState.create(model, ft.optim.adamw(1e-3), seed=0, copy=True)


# -- immutability --------------------------------------------------------------------------------


def test_fields_cannot_be_set(state):
    for field in ("step", "params", "opt_state", "made_up"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(state, field, None)


def test_replace_makes_a_new_state_and_shares_the_rest(state):
    step = state.step + 1
    new = state.replace(step=step)
    assert new is not state and isinstance(new, TrainState)
    assert new.step is step and state.step.item() == 0
    assert new.params is state.params and new.opt_state is state.opt_state and new.rng is state.rng


def test_replace_rejects_unknown_fields(state):
    with pytest.raises(TypeError, match=r"no field\(s\) \['lr', 'parms'\]; fields are \['step', 'params'"):
        state.replace(parms={}, lr=1.0)


# -- create() from a transformers model with tied and frozen weights -----------------------------


def test_create_lists_tied_weights_once_and_reproduces_logits(model):
    assert model.lm_head.weight is model.transformer.wte.weight  # the config ties them
    state = TrainState.create(model, ft.optim.adamw(1e-3))
    assert TIED[0] in state.params and TIED[1] not in state.params and TIED[1] not in state.buffers
    assert len(state.params) == len({id(p) for p in model.parameters()})
    # No copy by default: the state's tensors are the module's storages.
    assert state.params[TIED[0]].data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(logits_of(model, state, ids), expected, rtol=0, atol=0)
    assert state.step.dtype == torch.int64 and state.step.ndim == 0 and state.step.item() == 0


def test_functional_call_reties_the_output_embedding(model):
    """Changing the one tied tensor in the state changes the input *and* output embeddings."""
    state = TrainState.create(model, ft.optim.adamw(1e-3), copy=True)
    new_wte = state.params[TIED[0]] * 1.5
    ids = input_ids()
    reference = tiny_gpt2()
    with torch.no_grad():
        reference.transformer.wte.weight.mul_(1.5)  # tied: lm_head sees it too
        expected = reference(ids).logits
    got = logits_of(model, state.replace(params={**state.params, TIED[0]: new_wte}), ids)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_copy_true_gives_independent_tensors(model):
    state = TrainState.create(model, ft.optim.sgd(0.1), copy=True)
    name = "transformer.h.0.mlp.c_fc.bias"
    before = model.get_parameter(name).detach().clone()
    state.params[name].add_(1.0)
    assert torch.equal(model.get_parameter(name), before)


def test_frozen_parameters_go_to_buffers_and_out_of_the_optimizer():
    model = tiny_gpt2()
    frozen = ["transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    model.register_buffer("extra_stat", torch.arange(3.0))
    state = TrainState.create(model, ft.optim.adamw(1e-3))
    for name in frozen:
        assert name in state.buffers and name not in state.params
    assert "extra_stat" in state.buffers
    opt_paths = tree.paths(state.opt_state)
    assert not [p for p in opt_paths if any(name in p for name in frozen)]
    # Adam's moments cover exactly the trainable params.
    assert set(state.opt_state[0].mu) == set(state.params)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(logits_of(model, state, ids), expected, rtol=0, atol=0)


def test_create_rejects_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TrainState.create({"w": torch.ones(2)}, ft.optim.sgd(0.1))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TrainState.create(frozen, ft.optim.sgd(0.1))


# -- pytree --------------------------------------------------------------------------------------


def _types(x):
    """The nested container types of a pytree (leaves as their class), for exact comparisons."""
    if isinstance(x, TrainState):
        return (TrainState, tuple(_types(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if isinstance(x, dict):
        return (dict, tuple((k, _types(v)) for k, v in x.items()))
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_types(v) for v in x))
    return type(x)


def test_flatten_unflatten_round_trip_keeps_exact_types(state):
    leaves, treedef = tree.flatten(state)
    # step, params + mu + nu, adam count, lr count + lr, rng
    assert len(leaves) == 1 + len(state.params) * 3 + 1 + 2 + 1
    rebuilt = tree.unflatten(treedef, leaves)
    assert type(rebuilt) is TrainState
    assert _types(rebuilt) == _types(state)
    adam, empty, lr = rebuilt.opt_state
    assert (type(adam), type(empty), type(lr)) == (ScaleByAdamState, EmptyState, ScaleByLearningRateState)
    assert all(a is b for a, b in zip(tree.leaves(rebuilt), tree.leaves(state)))
    # A map builds a new state of the same structure.
    doubled = tree.map(lambda x: x * 2, state)
    assert _types(doubled) == _types(state) and doubled.step.dtype == torch.int64
    assert tree.paths(state)[0] == "step" and "params.lm_head.weight" not in tree.paths(state)


def test_state_fields_are_traceable_by_torch_compile():
    """A fullgraph compile of a function that reads fields and calls replace() must not break."""
    torch._dynamo.reset()
    state = TrainState.create(torch.nn.Linear(3, 2), ft.optim.sgd(0.1), copy=True)

    @torch.compile(fullgraph=True, backend="eager")
    def bump(s):
        return s.replace(step=s.step + 1, params={k: v * 2 for k, v in s.params.items()})

    new = bump(state)
    assert type(new) is TrainState and new.step.item() == 1
    torch.testing.assert_close(new.params["weight"], state.params["weight"] * 2)


# -- donation ------------------------------------------------------------------------------------


def test_consumed_state_raises_on_any_field_access(state):
    params = state.params
    assert not state.consumed
    state.mark_consumed(by="train_step(donate=True)")
    assert state.consumed and isinstance(state, TrainState)
    for field in ("step", "params", "buffers", "opt_state", "rng", "loss_scale", "extras"):
        with pytest.raises(ConsumedStateError, match=r"donated to train_step\(donate=True\).*state that step returned"):
            getattr(state, field)
    with pytest.raises(ConsumedStateError):
        state.replace(step=torch.tensor(1))
    with pytest.raises(ConsumedStateError):
        tree.flatten(state)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = torch.tensor(0)
    assert repr(state) == "TrainState(<consumed>)"
    assert params  # references taken before donation stay usable (they hold the new values)


def test_consuming_one_state_leaves_its_replacements_alive(state):
    new = state.replace(step=state.step + 1)
    state.mark_consumed()
    assert new.step.item() == 1 and not new.consumed
    assert "step=1" in repr(new)
