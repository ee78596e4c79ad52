"""Bad input to functrain.optim gives clear errors that name the problem."""

import pytest
import torch

import functrain.core.optim as optim


def params():
    return {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(3), "head.weight": torch.ones(3)}


def test_grads_with_a_different_structure_than_params():
    tx = optim.adamw(1e-3)
    p = params()
    state = tx.init(p)
    grads = {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(3), "head.wieght": torch.ones(3)}
    with pytest.raises(ValueError, match="same tree structure") as err:
        tx.update(grads, state, p)
    assert "head.wieght" in str(err.value) and "head.weight" in str(err.value)


def test_mask_selecting_no_parameter():
    tx = optim.adamw(1e-3, mask=lambda p: {k: k.startswith("decoder.") for k in p})
    with pytest.raises(ValueError, match="selects no parameter"):
        tx.init(params())


def test_mask_with_wrong_keys():
    tx = optim.masked(optim.add_decayed_weights(0.1), {"layer.weight": True})
    with pytest.raises(ValueError, match=r"mask must be shaped like the params.*missing entries for \['head.weight', 'layer.bias'\]"):
        tx.init(params())


def test_mask_with_tensor_entries():
    tx = optim.masked(optim.add_decayed_weights(0.1), {k: torch.tensor(True) for k in params()})
    with pytest.raises(TypeError, match="Python bools"):
        tx.init(params())


@pytest.mark.parametrize("factory", [optim.adamw, optim.sgd, optim.lion, optim.rmsprop, optim.adagrad])
def test_negative_learning_rate(factory):
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0.0, got -0.1"):
        factory(-0.1)


def test_negative_learning_rate_under_inject_hyperparams():
    with pytest.raises(ValueError, match="learning_rate must be >= 0.0"):
        optim.inject_hyperparams(optim.adamw)(learning_rate=-1e-3)


def test_partition_with_unlabeled_parameter():
    tx = optim.partition({"w": optim.adam(1e-3), "b": optim.sgd(0.1)}, {r"weight$": "w", r"\.bias$": "b"})
    ok = {"layer.weight": torch.ones(2), "layer.bias": torch.zeros(2)}
    tx.init(ok)
    with pytest.raises(ValueError, match="match no pattern") as err:
        tx.init({**ok, "scale": torch.ones(())})
    assert "'scale'" in str(err.value)


def test_partition_with_label_without_transform():
    tx = optim.partition({"w": optim.adam(1e-3)}, lambda name, p: "w" if p.ndim > 1 else "frozen")
    with pytest.raises(ValueError, match=r"label\(s\) \['frozen'\] have no transform"):
        tx.init(params())


def test_adafactor_manual_lr_with_relative_step():
    with pytest.raises(ValueError, match="relative_step"):
        optim.adafactor(1e-3)


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="chain argument 1"):
        optim.chain(optim.identity(), lambda g: g)
