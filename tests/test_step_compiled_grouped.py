"""compile=True, donate=True, leafwise_update=True (the compiled Trainer's step for AdamW & co.):
only the window's gradients are compiled and the update runs after the graph, a group of
parameters at a time, in place. Same numbers as the compiled whole step over >= 4 steps from a
state whose params differ from the module's, and no second copy of params and optimizer state."""

import ctypes
import gc

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.step import grouped_update
from functrain.step.train import make_train_step
from step_models import MLP, cls_batch, moved_state

pytestmark = pytest.mark.slow

OPTIMIZERS = {
    "adamw_masked_decay": lambda m: ft.optim.adamw(ft.schedules.get_schedule("linear", 1e-2, num_training_steps=6,
                                                                              num_warmup_steps=2),
                                                   weight_decay=0.1, mask=ft.optim.default_weight_decay_mask(m)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_grouped_step_equals_compiled_whole_step(name, monkeypatch):
    monkeypatch.setattr(grouped_update, "GROUPS", 3)  # several groups even for a tiny model
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(dropout=0.0)
    tx = OPTIMIZERS[name](model)
    batches = [cls_batch(seed=i) for i in range(5)]
    kw = dict(compile=True, max_grad_norm=0.5, skip_non_finite=True)
    whole_step = make_train_step(model, tx, **kw)
    grouped_step = make_train_step(model, tx, donate=True, leafwise_update=True, **kw)
    whole = moved_state(model, tx)
    grouped = ft.TrainState.create(model, tx, copy=True).replace(params=ft.tree.clone(whole.params))
    ptrs = [t.data_ptr() for t in ft.tree.leaves((grouped.params, grouped.opt_state))]
    for b in batches:
        whole, m_whole = whole_step(whole, b)
        grouped, m = grouped_step(grouped, b)
        for key in ("loss", "grad_norm", "learning_rate", "skipped"):
            if key in m_whole:
                assert torch.allclose(m[key].double(), m_whole[key].double(), rtol=1e-6, atol=1e-7), key
    assert len(grouped_update.parameter_groups(grouped.params, 3)) > 1
    assert [t.data_ptr() for t in ft.tree.leaves((grouped.params, grouped.opt_state))] == ptrs  # in place
    assert ft.tree.relative_difference(grouped.params, whole.params) <= 1e-6
    assert ft.tree.relative_difference(grouped.params, moved_state(model, tx).params) > 1e-3  # it trained
    for path, a in ft.tree.named_leaves(whole.opt_state).items():
        b = ft.tree.named_leaves(grouped.opt_state)[path]
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), path
    assert int(grouped.step) == len(batches)


class Tables(nn.Module):
    """Big parameters in several tensors, tiny activations: a step's peak is its copies of the state."""

    def __init__(self, tables=8, rows=1600, width=1024):  # 13.1M params, 50 MB
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(rows, width) for _ in range(tables))

    def forward(self, x):
        return sum(t(x).pow(2).mean() for t in self.tables)


def _peak_rss_mb_during(fn) -> float:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_mb("VmHWM")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    fn()
    return _status_mb("VmHWM") - base


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    pytest.skip(f"no {field} in /proc/self/status")


def test_compiled_grouped_step_holds_one_copy_of_params_and_optimizer_state():
    try:  # large blocks by mmap: freed memory leaves the process, so the peak RSS is what was alive
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pytest.skip("not glibc")
    torch._dynamo.reset()
    model = Tables()
    params_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    batch = {"x": torch.randint(0, 1600, (4, 16))}
    peaks = {}
    for leafwise in (True, False):
        tx = ft.optim.adamw(1e-3)
        step = make_train_step(model, tx, lambda m, b: m(b["x"]), compile=True, donate=True,
                               max_grad_norm=1.0, leafwise_update=leafwise)
        box = [ft.TrainState.create(model, tx, copy=True)]

        def one():
            box[0], _ = step(box[0], batch)

        one(), one()  # compile, and the first step's lazily created buffers
        peaks[leafwise] = _peak_rss_mb_during(one)
        del box, step
    # grouped: the gradients (1x params) and one group's temporaries (~1/8 of 4x params)
    print(peaks, params_mb)
    assert peaks[True] < 2.5 * params_mb, (peaks, params_mb)
    # control: the whole graph returns new params, moments and gradients (~4x params) at once
    assert peaks[False] > 3.2 * params_mb, (peaks, params_mb)
