"""The step runs the module in train (eval) mode and gives every submodule its own mode back."""

import torch
from torch import nn

import functrain as ft
from functrain.step.train import make_eval_step, make_train_step


class Recorder(nn.Module):
    """Records ``self.training`` at each forward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


class FrozenNorm(nn.Module):
    """A model whose ``train()`` keeps one submodule in eval mode (as frozen-BatchNorm models do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.frozen = Recorder()
        self.free = Recorder()

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        return self.free(self.frozen(self.lin(x)))


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 4, generator=g), "y": torch.randn(2, 4, generator=g)}


def test_modes_are_set_for_the_step_and_restored_module_by_module():
    model = nn.Sequential(nn.Linear(4, 4), Recorder(), nn.Linear(4, 4), Recorder())
    model.eval()
    model[2].train()  # a mixed tree: one submodule in train mode
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx, copy=True)
    make_train_step(model, tx, _mse, required_keys=("x", "y"))(state, _batch())
    make_eval_step(model, _mse)(state, _batch())
    assert model[1].seen == [True, False] and model[3].seen == [True, False]
    assert [m.training for m in model.modules()] == [False, False, False, True, False]


def test_a_module_with_its_own_train_method_gets_it_called():
    model = FrozenNorm()
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx, copy=True)
    step = make_train_step(model, tx, _mse, required_keys=("x", "y"))
    for mode in (False, True):  # from eval mode (the override runs) and from its own train mode
        model.train(mode)
        before = [m.training for m in model.modules()]
        state, _ = step(state, _batch())
        assert [m.training for m in model.modules()] == before
    assert model.frozen.seen == [False, False] and model.free.seen == [True, True]
