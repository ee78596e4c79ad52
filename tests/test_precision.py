"""functrain.precision against torch.amp.GradScaler and torch.autocast."""

import pytest
import torch

from functrain import precision, tree
from functrain.core.precision import DynamicScale, dynamic_scale_init, dynamic_scale_update, get_policy, scale_loss, unscale

# Steps whose input holds inf or nan: consecutive ones, isolated ones, and long finite runs
# between them so that growth_interval=3 grows the scale several times.
BAD_STEPS = {2: float("inf"), 3: float("nan"), 9: float("-inf"), 17: float("inf"), 18: float("inf"), 19: float("nan")}


def _inputs(n_steps, dim=5):
    g = torch.Generator().manual_seed(0)
    xs = []
    for i in range(n_steps):
        x = torch.randn(dim, generator=g)
        if i in BAD_STEPS:
            x[i % dim] = BAD_STEPS[i]
        xs.append(x)
    return xs


def test_update_sequence_matches_grad_scaler():
    n_steps, lr = 30, 0.1
    xs = _inputs(n_steps)
    w0 = torch.linspace(-1, 1, 5)
    kwargs = dict(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)

    # Reference: the imperative GradScaler loop.
    w_ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w_ref], lr=lr)
    scaler = torch.amp.GradScaler("cpu", **kwargs)

    # Ours: pure functions of (params, ds).
    w, ds = w0.clone(), dynamic_scale_init(**kwargs)

    def loss_fn(w, x):
        return (w * x).sum()

    scales, skipped_ref, skipped = [], [], []
    for i, x in enumerate(xs):
        opt.zero_grad()
        scaler.scale(loss_fn(w_ref, x)).backward()
        before = w_ref.detach().clone()
        scaler.step(opt)
        scaler.update()
        skipped_ref.append(torch.equal(before, w_ref.detach()))

        grads = torch.func.grad(lambda w: scale_loss(loss_fn(w, x), ds))(w)
        grads = unscale(grads, ds)
        finite = tree.all_finite(grads)
        w_new = torch.where(finite, w - lr * grads, w)
        skipped.append(torch.equal(w_new, w))
        w, ds = w_new, dynamic_scale_update(ds, finite)

        assert ds.scale.item() == scaler.get_scale(), f"scale differs after step {i}"
        assert ds.growth_tracker.item() == scaler._growth_tracker.item(), f"growth tracker differs after step {i}"
        torch.testing.assert_close(w, w_ref.detach(), rtol=1e-6, atol=1e-7)  # SGD fuses the multiply-add
        scales.append(ds.scale.item())

    assert skipped == skipped_ref
    assert [i for i, s in enumerate(skipped) if s] == sorted(BAD_STEPS)
    # The run really exercised both directions.
    changes = [b / a for a, b in zip(scales, scales[1:]) if a != b]
    assert 2.0 in changes and 0.5 in changes


def test_growth_that_would_overflow_keeps_scale_like_grad_scaler():
    big = 2.0**127
    scaler = torch.amp.GradScaler("cpu", init_scale=big, growth_interval=1)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    scaler.update()
    ds = dynamic_scale_update(dynamic_scale_init(big, growth_interval=1), torch.tensor(True))
    assert ds.scale.item() == scaler.get_scale() == big
    assert ds.growth_tracker.item() == scaler._growth_tracker.item() == 0


def test_defaults_match_grad_scaler():
    ds, scaler = dynamic_scale_init(), torch.amp.GradScaler("cpu")
    assert ds.scale.item() == scaler._init_scale
    assert ds.growth_factor.item() == scaler.get_growth_factor()
    assert ds.backoff_factor.item() == scaler.get_backoff_factor()
    assert ds.growth_interval.item() == scaler.get_growth_interval()
    assert (ds.scale.dtype, ds.growth_tracker.dtype) == (torch.float32, torch.int32)
    assert all(t.ndim == 0 for t in ds)


def test_update_is_pure_and_a_pytree():
    ds = dynamic_scale_init(growth_interval=3)
    before = tree.clone(ds)
    new = dynamic_scale_update(ds, torch.tensor(False))
    assert tree.tensors_equal(ds, before), "update mutated its input"
    assert new.scale.item() == 32768.0
    leaves, treedef = tree.flatten(new)
    assert len(leaves) == 5
    rebuilt = tree.unflatten(treedef, leaves)
    assert type(rebuilt) is DynamicScale and tree.tensors_equal(rebuilt, new)


def test_compiled_update_does_not_recompile():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def step(ds, grads):
        grads = unscale(grads, ds)
        return dynamic_scale_update(ds, tree.all_finite(grads)), grads

    ds = dynamic_scale_init(init_scale=8.0, growth_interval=2)
    eager = dynamic_scale_init(init_scale=8.0, growth_interval=2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(6):
            g = {"w": torch.full((3,), 8.0)}
            if i == 3:
                g["w"][1] = float("inf")
            ds, unscaled = step(ds, g)
            eager = dynamic_scale_update(eager, tree.all_finite(unscale(g, eager)))
            assert tree.tensors_equal(ds, eager)


def test_unscale_keeps_dtype_and_divides():
    ds = dynamic_scale_init(init_scale=4.0)
    grads = {"a": torch.tensor([8.0, 2.0], dtype=torch.float16), "b": torch.tensor([4.0])}
    out = unscale(grads, ds)
    assert out["a"].dtype == torch.float16
    torch.testing.assert_close(out["a"], torch.tensor([2.0, 0.5], dtype=torch.float16))
    torch.testing.assert_close(out["b"], torch.tensor([1.0]))
    assert grads["b"].item() == 4.0  # input untouched
    assert unscale(grads, None) is grads
    loss = torch.tensor(3.0)
    assert scale_loss(loss, ds).item() == 12.0 and scale_loss(loss, None) is loss


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_scale=0.0), "init_scale"),
        (dict(growth_factor=1.0), "growth_factor"),
        (dict(backoff_factor=1.5), "backoff_factor"),
        (dict(growth_interval=0), "growth_interval"),
        (dict(growth_interval=2.5), "growth_interval"),
    ],
)
def test_init_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_scale_init(**kwargs)


def test_update_rejects_bad_input():
    ds = dynamic_scale_init()
    with pytest.raises(TypeError, match="0-d bool"):
        dynamic_scale_update(ds, True)
    with pytest.raises(TypeError, match="0-d bool"):
        dynamic_scale_update(ds, torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="DynamicScale"):
        dynamic_scale_update((ds.scale,), torch.tensor(True))


def test_policies():
    assert get_policy("fp32") == precision.Policy("fp32", None, False)
    assert get_policy("no").name == "fp32"
    bf16, fp16 = get_policy("bf16"), get_policy("FP16")
    assert (bf16.compute_dtype, bf16.needs_loss_scale) == (torch.bfloat16, False)
    assert (fp16.compute_dtype, fp16.needs_loss_scale) == (torch.float16, True)
    assert get_policy(bf16) is bf16
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with bf16.autocast("cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with get_policy("fp32").autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*bf16"):
        get_policy("fp8")
    with pytest.raises(TypeError):
        get_policy(torch.float16)
