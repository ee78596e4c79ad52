"""Property tests (hypothesis) for functrain.optim: purity, masking, identity, state round-trips."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import functrain.core.optim as optim
from functrain import tree

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
param_shapes = st.dictionaries(st.sampled_from(["a.weight", "a.bias", "b.weight", "norm.weight", "c"]), shapes,
                               min_size=1, max_size=5)


def build(shape_dict, seed):
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=g) for k, s in shape_dict.items()}
    grads = {k: torch.randn(s, generator=g) for k, s in shape_dict.items()}
    return params, grads


def all_optimizers(params):
    decay_mask = {k: not k.endswith("bias") for k in params}
    if not any(decay_mask.values()):
        decay_mask = {k: True for k in params}
    return {
        "adamw": optim.adamw(1e-2, weight_decay=0.1, mask=decay_mask),
        "adam_amsgrad": optim.adam(1e-2, amsgrad=True),
        "sgd": optim.sgd(0.1, momentum=0.9, nesterov=True),
        "rmsprop": optim.rmsprop(1e-2, centered=True, momentum=0.9),
        "adagrad": optim.adagrad(0.1, lr_decay=0.01),
        "lion": optim.lion(1e-3),
        "adafactor": optim.adafactor(1e-2, relative_step=False, beta1=0.9, weight_decay=0.1),
        "adafactor_relative": optim.adafactor(),
        "inject": optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, b1=0.8),
        "if_finite": optim.apply_if_finite(optim.sgd(0.1, momentum=0.9), 3),
        "partition": optim.partition({"x": optim.adam(1e-2), "y": optim.sgd(0.1)}, {r"weight": "x", ".*": "y"}),
        "clip_chain": optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3)),
    }


@SETTINGS
@given(param_shapes, st.integers(0, 2**16))
def test_update_never_mutates_its_inputs(shape_dict, seed):
    params, grads = build(shape_dict, seed)
    for name, tx in all_optimizers(params).items():
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)  # one step so states are non-trivial
        before = (tree.clone(grads), tree.clone(state), tree.clone(params))
        tx.update(grads, state, params)
        after = (grads, state, params)
        assert tree.tensors_equal(before, after), f"{name}.update changed an input"


@SETTINGS
@given(param_shapes, st.integers(0, 2**16), st.data())
def test_masked_and_partition_leave_unselected_updates_untouched(shape_dict, seed, data):
    params, grads = build(shape_dict, seed)
    names = sorted(params)
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    mask = {k: k in chosen for k in params}
    tx = optim.masked(optim.chain(optim.scale(-3.0), optim.add_decayed_weights(0.5)), mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        if k in chosen:
            assert torch.allclose(updates[k], -3.0 * grads[k] + 0.5 * params[k])
        else:
            assert updates[k] is grads[k] or torch.equal(updates[k], grads[k])

    labels = {k: ("scaled" if k in chosen else "kept") for k in params}
    tx = optim.partition({"scaled": optim.scale(2.0), "kept": optim.identity()}, labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        expected = 2.0 * grads[k] if k in chosen else grads[k]
        assert torch.equal(updates[k], expected)


@SETTINGS
@given(param_shapes, st.integers(0, 2**16), st.integers(0, 4))
def test_chain_of_identities_is_identity(shape_dict, seed, n):
    params, grads = build(shape_dict, seed)
    tx = optim.chain(*[optim.identity() for _ in range(n)])
    updates, state = tx.update(grads, tx.init(params), params)
    assert tree.tensors_equal(updates, grads)
    assert len(state) == n


@SETTINGS
@given(param_shapes, st.integers(0, 2**16))
def test_state_round_trips_through_flatten_with_exact_types(shape_dict, seed):
    params, grads = build(shape_dict, seed)
    for name, tx in all_optimizers(params).items():
        _, state = tx.update(grads, tx.init(params), params)
        leaves, treedef = tree.flatten(state)
        rebuilt = tree.unflatten(treedef, [x.clone() for x in leaves])
        assert tree.structure(rebuilt) == tree.structure(state), name
        assert tree.tensors_equal(rebuilt, state), name
        _assert_same_types(rebuilt, state, name)


def _assert_same_types(a, b, where):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same_types(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, tuple):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_types(x, y, f"{where}.{getattr(type(a), '_fields', range(len(a)))[i]}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where


def test_apply_if_finite_skips_nonfinite_updates_and_keeps_state():
    params = {"w": torch.ones(3), "b": torch.zeros(())}
    tx = optim.apply_if_finite(optim.adam(0.1), max_consecutive_errors=2)
    state = tx.init(params)
    good = {"w": torch.ones(3), "b": torch.ones(())}
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0]), "b": torch.ones(())}
    _, state = tx.update(good, state, params)
    inner_before = tree.clone(state.inner_state)
    for i in (1, 2):
        updates, state = tx.update(bad, state, params)
        assert all(torch.equal(u, torch.zeros_like(u)) for u in tree.leaves(updates))
        assert tree.tensors_equal(state.inner_state, inner_before)
        assert int(state.notfinite_count) == i and not bool(state.last_finite)
    updates, state = tx.update(bad, state, params)  # third in a row > 2: applied anyway (optax)
    assert torch.isnan(updates["w"]).any()
    assert int(state.total_notfinite) == 3
    updates, state = tx.update(good, state, params)
    assert int(state.notfinite_count) == 0 and bool(state.last_finite) and int(state.total_notfinite) == 3
