"""reduce_on_plateau: a pure transformation, against torch's ReduceLROnPlateau and optax's rules."""

import pytest
import torch

import functrain.optim as optim

PEAK = 1e-3
# Falls, plateaus (with changes under the threshold), rises, recovers, and a nan.
METRICS = [5.0, 4.0, 4.0, 3.9999, 4.1, 4.2, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.9, 3.5, 3.6, 3.7,
           float("nan"), 3.8, 3.9, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(patience=1, factor=0.5),
        dict(patience=2, cooldown=2, factor=0.3, min_lr=1e-4),
        dict(mode="max", patience=1, threshold=0.01, threshold_mode="abs"),
        dict(mode="max", patience=0, threshold=0.1),
        dict(mode="min", patience=0, threshold=0.05, threshold_mode="abs", min_lr=5e-4, factor=0.5),
    ],
    ids=str,
)
def test_external_feed_matches_torch_reduce_lr_on_plateau(kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    settings = optim.plateau_arguments_from_torch(PEAK, **kwargs)
    tx = optim.chain(optim.sgd(PEAK), optim.reduce_on_plateau(**settings, observe="external"))
    params = {"w": torch.zeros(3)}
    state = tx.init(params)
    reductions = 0
    for i, m in enumerate(METRICS):
        ref.step(m)
        state = optim.observe_plateau(state, torch.tensor(m) if i % 2 else m, **settings)
        plateau = state[1]
        assert float(plateau.scale) * PEAK == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), f"step {i}"
        assert int(plateau.cooldown_count) == ref.cooldown_counter, f"step {i}"
        # the update really is scaled: sgd's -PEAK * g times the scale
        u, state = tx.update({"w": torch.ones(3)}, state, params)
        torch.testing.assert_close(u["w"], torch.full((3,), -opt.param_groups[0]["lr"]), rtol=1e-6, atol=0)
        reductions += opt.param_groups[0]["lr"] < PEAK
    assert reductions > 0 or kwargs == {}, "the metric sequence should trigger a reduction"


def optax_reference(values, factor, patience, rtol, atol, cooldown, accumulation_size, min_scale):
    """optax.contrib.reduce_on_plateau's update rule, transcribed with Python numbers."""
    scale, best, plateau, cool, count, avg, out = 1.0, float("inf"), 0, 0, 0, 0.0, []
    for v in values:
        count += 1
        avg = ((count - 1) * avg + v) / count
        if count == accumulation_size:
            improved = avg < (1 - rtol) * best - atol
            best = avg if improved else best
            plateau = 0 if improved else plateau + 1
            if cool > 0:
                plateau, cool = 0, cool - 1
            else:
                hit = plateau == patience
                scale = max(scale * factor if hit else scale, min_scale)
                plateau, cool = (0, cooldown) if hit else (plateau, 0)
            count, avg = 0, 0.0
        out.append(scale)
    return out


def test_update_feed_follows_optax_rules_with_accumulation():
    kw = dict(factor=0.5, patience=2, rtol=1e-3, atol=0.01, cooldown=1, accumulation_size=2, min_scale=0.1)
    tx = optim.reduce_on_plateau(**kw)
    params = {"w": torch.zeros(2)}
    state, scales = tx.init(params), []
    for v in METRICS[:-1]:  # (the reference's inf best would make nan comparisons differ in Python)
        v = 4.0 if v != v else v
        u, state = tx.update({"w": torch.ones(2)}, state, params, value=torch.tensor(v))
        scales.append(float(state.scale))
        assert float(u["w"][0]) == pytest.approx(scales[-1])
    clean = [4.0 if v != v else v for v in METRICS[:-1]]
    assert scales == pytest.approx(optax_reference(clean, **kw))
    assert min(scales) < 1.0


def test_plateau_inside_a_compiled_step_does_not_recompile_when_fed():
    from functrain import TrainState, make_train_step

    model = torch.nn.Linear(3, 1)
    settings = optim.plateau_arguments_from_torch(0.1, patience=0, factor=0.5)
    tx = optim.chain(optim.sgd(0.1), optim.reduce_on_plateau(**settings, observe="external"))
    step = make_train_step(model, tx, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(), compile=True)
    state = TrainState.create(model, tx, copy=True)
    batch = {"x": torch.randn(4, 3), "y": torch.randn(4, 1)}
    torch._dynamo.reset()
    lrs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for metric in (1.0, 2.0, 3.0):
            state, metrics = step(state, batch)
            lrs.append(float(metrics["learning_rate"]))
            state = state.replace(opt_state=optim.observe_plateau(state.opt_state, metric, **settings))
    assert lrs == pytest.approx([0.1, 0.1, 0.05])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        optim.reduce_on_plateau(mode="best")
    with pytest.raises(ValueError, match="threshold_mode"):
        optim.plateau_arguments_from_torch(1e-3, threshold_mode="pct")
    with pytest.raises(ValueError, match="factor"):
        optim.reduce_on_plateau(factor=1.0)
    with pytest.raises(ValueError, match="learning rate"):
        optim.plateau_arguments_from_torch(-1.0)
    with pytest.raises(ValueError, match="value=loss"):
        tx = optim.reduce_on_plateau()
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
    with pytest.raises(ValueError, match="no reduce_on_plateau state"):
        optim.observe_plateau(optim.adam(1e-3).init({"w": torch.ones(1)}), 1.0)
