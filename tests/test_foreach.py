"""core/foreach.py: one dispatch for the multi-tensor ops; a population switches it per thread only."""

import pathlib
import re
import threading

import pytest
import torch

import functrain
from functrain.core import foreach
from functrain import optim, population as P
from tests.step_models import MLP


def _lists(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(3, 4, generator=g) + 0.5, torch.rand(5, generator=g) + 0.5],
            [torch.rand(3, 4, generator=g) + 0.5, torch.rand(5, generator=g) + 0.5])


CASES = [
    ("add", lambda xs, ys: ((xs, ys), {"alpha": 0.5})),
    ("sub", lambda xs, ys: ((xs, ys), {})),
    ("mul", lambda xs, ys: ((xs, 3.0), {})),
    ("div", lambda xs, ys: ((xs, ys), {})),
    ("sqrt", lambda xs, ys: ((xs,), {})),
    ("lerp", lambda xs, ys: ((xs, ys, 0.25), {})),
    ("maximum", lambda xs, ys: ((xs, ys), {})),
    ("addcmul", lambda xs, ys: ((xs, ys, ys), {"value": 0.1})),
    ("addcdiv", lambda xs, ys: ((xs, ys, ys), {"value": 0.1})),
    ("norm", lambda xs, ys: ((xs,), {"ord": float("inf")})),
    ("sign", lambda xs, ys: ((xs,), {})),
    ("pow", lambda xs, ys: ((xs, 2.0), {})),
]


@pytest.mark.parametrize("name,make_args", CASES, ids=[c[0] for c in CASES])
def test_per_tensor_equals_the_fused_kernel(name, make_args):
    xs, ys = _lists()
    args, kwargs = make_args(xs, ys)
    fused = getattr(torch, f"_foreach_{name}")(*args, **kwargs)
    with foreach.per_tensor():
        mine = getattr(foreach, name)(*args, **kwargs)
    assert len(mine) == len(fused)
    for a, b in zip(mine, fused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["add_", "addcmul_", "copy_"])
def test_in_place_ops_write_the_inputs(name):
    xs, ys = _lists()
    args = {"add_": (ys,), "addcmul_": (ys, ys), "copy_": (ys,)}[name]
    expected = [x.clone() for x in xs]
    getattr(torch, f"_foreach_{name}")(expected, *args)
    with foreach.per_tensor():
        assert getattr(foreach, name)(xs, *args) is None
    for a, b in zip(xs, expected):
        torch.testing.assert_close(a, b)


def test_switch_is_per_thread_and_restored():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = foreach.per_tensor_active()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with foreach.per_tensor():
        with foreach.per_tensor():  # re-entrant
            pass
        seen["main"] = foreach.per_tensor_active()
        inside.set()
        release.wait(10)
    t.join()
    assert seen == {"main": True, "other": False}
    assert not foreach.per_tensor_active()


def test_population_step_leaves_torch_functions_alone():
    """A population step runs per tensor without rebinding torch._foreach_* (other threads and
    libraries keep the fused kernels)."""
    before = {k: v for k, v in vars(torch).items() if k.startswith("_foreach_")}
    seen = []

    class Spy(MLP):
        def forward(self, x, labels=None):
            seen.append((foreach.per_tensor_active(),
                         all(getattr(torch, k) is v for k, v in before.items())))
            return super().forward(x, labels)

    stacked, tx = P.create_population(Spy, optim.inject_hyperparams(optim.adamw),
                                      [dict(learning_rate=1e-3), dict(learning_rate=2e-3)], seeds=[0, 1])
    step = P.make_population_train_step(Spy(), tx)
    g = torch.Generator().manual_seed(0)
    stacked, _ = step(stacked, {"x": torch.randn(4, 8, generator=g), "labels": torch.tensor([0, 1, 2, 3])})
    assert seen and all(active and same for active, same in seen)
    assert {k: v for k, v in vars(torch).items() if k.startswith("_foreach_")} == before
    assert not foreach.per_tensor_active()


def test_library_code_calls_foreach_ops_only_through_the_dispatch():
    """Every multi-tensor op of functrain goes through core/foreach.py (so a population can switch
    it), and no library code rebinds a function of torch (settings such as
    torch.backends.*.allow_tf32, which TrainingArguments.tf32 sets as HF does, are not functions)."""
    root = pathlib.Path(functrain.__file__).parent
    direct, rebinds = [], []
    for path in root.rglob("*.py"):
        if path == root / "core" / "foreach.py":
            continue
        text = path.read_text()
        rel = path.relative_to(root)
        direct += [f"{rel}: {m.group(0)}" for m in re.finditer(r"torch\._foreach_\w+\(", text)]
        rebinds += [f"{rel}: {m.group(0)}" for m in re.finditer(r"setattr\(\s*torch\b|^\s*torch(\.nn\.functional|\.Tensor)?\.\w+\s*=[^=]", text, re.M)]
    assert direct == [], f"call functrain.core.foreach instead of torch._foreach_*: {direct}"
    assert rebinds == [], f"library code rebinds torch functions: {rebinds}"
