"""functrain.schedules against transformers.get_scheduler and torch's ReduceLROnPlateau."""

import types
import warnings

import pytest
import torch
from transformers import TrainingArguments, get_scheduler

from functrain import schedules
from functrain.core.schedules import get_schedule, join_schedules

PEAK = 1e-3
TOTAL = 1000
EVAL_STEPS = 1050  # a little past the end: the schedules' tails differ there
WARMUPS = [0, 10, 100, 0.07]  # steps, and one ratio of TOTAL

# (HF name, schedule settings); each is checked with every warmup in WARMUPS.
CASES = [
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.3}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 37}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.7}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-4, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 300}),
    ("warmup_stable_decay", {"num_decay_steps": 200, "decay_type": "linear", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 250, "decay_type": "1-sqrt", "warmup_type": "cosine"}),
    ("warmup_stable_decay", {"num_decay_steps": 100, "num_stable_steps": 500, "warmup_type": "1-sqrt",
                             "min_lr_ratio": 0.2}),
]


def hf_warmup_steps(warmup) -> int:
    """What TrainingArguments(warmup_steps=warmup).get_warmup_steps(TOTAL) gives (no full init)."""
    return TrainingArguments.get_warmup_steps(types.SimpleNamespace(warmup_steps=warmup), TOTAL)


def hf_learning_rates(name, warmup_steps, kwargs, n=EVAL_STEPS):
    """The rate a torch optimizer with lr=PEAK sees at each step under transformers' scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    lrs = []
    with warnings.catch_warnings():
        # "scheduler.step() before optimizer.step()"; wsd's "both num_training_steps and num_stable_steps"
        warnings.simplefilter("ignore")
        sched = get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=TOTAL,
                              scheduler_specific_kwargs=dict(kwargs))
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    return lrs


def _case_id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("warmup", WARMUPS, ids=lambda w: f"warmup={w}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_transformers(case, warmup):
    name, kwargs = case
    w = hf_warmup_steps(warmup)
    expected = hf_learning_rates(name, w, kwargs)
    as_ratio = isinstance(warmup, float)
    schedule = get_schedule(name, PEAK, num_training_steps=TOTAL,
                            num_warmup_steps=None if as_ratio else warmup,
                            warmup_ratio=warmup if as_ratio else None, **kwargs)
    got = [schedule(k) for k in range(EVAL_STEPS)]
    assert all(isinstance(v, float) for v in got)
    worst = max(abs(g - e) / PEAK for g, e in zip(got, expected))
    assert worst <= 1e-7, f"{name} {kwargs} warmup={warmup}: max |lr - hf| / peak = {worst:.3g}"
    # Tensor steps (int64 as the optimizer counter, and float) give the same values in fp32.
    for k in range(0, EVAL_STEPS, 37):
        for step in (torch.tensor(k), torch.tensor(float(k), dtype=torch.float64)):
            value = schedule(step)
            assert value.dtype == torch.float32 and value.ndim == 0
            assert abs(value.item() - got[k]) <= 1e-7 * PEAK


def test_warmup_ratio_forms_agree_with_training_arguments():
    for ratio in (0.0, 0.001, 0.05, 0.07, 0.333):
        assert schedules.warmup_steps(TOTAL, warmup_ratio=ratio) == hf_warmup_steps(ratio)
        # HF v5 spells a ratio as warmup_steps < 1.
        assert schedules.warmup_steps(TOTAL, num_warmup_steps=ratio) == hf_warmup_steps(ratio)
    assert schedules.warmup_steps(TOTAL, num_warmup_steps=25) == 25
    assert schedules.warmup_steps(TOTAL) == 0


def test_compiled_schedule_does_not_recompile_across_steps():
    torch._dynamo.reset()
    schedule = get_schedule("cosine_with_min_lr", PEAK, num_training_steps=TOTAL, num_warmup_steps=10,
                            min_lr_rate=0.1)
    wsd = schedules.warmup_stable_decay(PEAK, 10, 50, num_training_steps=100, decay_type="1-sqrt")
    joined = join_schedules([schedule, wsd], [500])

    @torch.compile(fullgraph=True, backend="eager")
    def apply(step, x):
        # A stand-in for an optimizer update: scale by the rate at this step.
        return x * schedule(step) + joined(step), step + 1

    x = torch.ones(3)
    step = torch.zeros((), dtype=torch.int64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            out, next_step = apply(step, x)
            k = int(step)
            torch.testing.assert_close(out, x * schedule(k) + joined(k), rtol=1e-6, atol=0)
            step = next_step
        for k in (9, 10, 499, 500, 560, 2000):  # across warmup, the join, the end of both pieces
            out, _ = apply(torch.tensor(k), x)
            torch.testing.assert_close(out, x * schedule(k) + joined(k), rtol=1e-6, atol=0)


def test_join_schedules_like_optax():
    warm = schedules.linear(1.0, num_warmup_steps=0, num_training_steps=10)  # 1 -> 0 over 10 steps
    flat = schedules.constant(0.25)
    joined = join_schedules([warm, flat, warm], [4, 8])
    expected = [warm(k) for k in range(4)] + [0.25] * 4 + [warm(k) for k in range(6)]
    assert [joined(k) for k in range(14)] == pytest.approx(expected, abs=1e-12)
    assert [joined(torch.tensor(k)).item() for k in range(14)] == pytest.approx(expected, abs=1e-7)
    assert join_schedules([flat], [])(123) == 0.25


def test_warmup_cosine_alias_is_cosine():
    a = schedules.warmup_cosine(3e-4, warmup=20, total=200)
    b = schedules.cosine(3e-4, num_warmup_steps=20, num_training_steps=200)
    assert [a(k) for k in range(0, 220, 7)] == [b(k) for k in range(0, 220, 7)]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: get_schedule("cosine_annealing", 1e-3, num_training_steps=10), ValueError,
         r"unknown schedule 'cosine_annealing'; known schedules are \[.*'cosine'.*'linear'"),
        (lambda: get_schedule("linear", -1e-3, num_training_steps=10), ValueError, "peak learning rate"),
        (lambda: get_schedule("linear", float("nan"), num_training_steps=10), ValueError, "peak learning rate"),
        (lambda: get_schedule("reduce_lr_on_plateau", 1e-3, num_training_steps=10), ValueError, "reduce_on_plateau"),
        (lambda: get_schedule("linear", 1e-3, num_training_steps=10, num_warmup_steps=2, warmup_ratio=0.1),
         ValueError, "not both"),
        (lambda: get_schedule("linear", 1e-3, num_training_steps=10, warmup_ratio=1.5), ValueError, "warmup_ratio"),
        (lambda: get_schedule("linear", 1e-3, num_training_steps=10, num_warmup_steps=-3), ValueError,
         "num_warmup_steps"),
        (lambda: get_schedule("linear", 1e-3, num_training_steps=10, num_cycles=2), TypeError, "unknown setting"),
        (lambda: get_schedule("constant", 1e-3, num_training_steps=10, power=2), TypeError, "constant"),
        (lambda: get_schedule("polynomial", 1e-3, num_training_steps=10, lr_end=1e-2), ValueError, "lr_end"),
        (lambda: get_schedule("cosine_with_min_lr", 1e-3, num_training_steps=10), ValueError, "min_lr"),
        (lambda: get_schedule("cosine_with_min_lr", 1e-3, num_training_steps=10, min_lr=1e-4, min_lr_rate=0.1),
         ValueError, "only one"),
        (lambda: get_schedule("warmup_stable_decay", 1e-3, num_training_steps=10, num_decay_steps=5,
                              decay_type="exp"), ValueError, "decay_type 'exp'"),
        (lambda: get_schedule("warmup_stable_decay", 1e-3, num_training_steps=10, num_warmup_steps=8,
                              num_decay_steps=5), ValueError, "exceed num_training_steps"),
        (lambda: schedules.linear(1e-3, 0, 10)(-1), ValueError, "step must be >= 0"),
        (lambda: schedules.linear(1e-3, 0, 10)(2.5), TypeError, "step must be an int"),
        (lambda: schedules.linear(1e-3, 0, 10)(torch.arange(3)), ValueError, "0-d tensor"),
        (lambda: join_schedules([schedules.constant(1.0)] * 2, [3, 4]), ValueError, "len\\(boundaries\\)"),
        (lambda: join_schedules([schedules.constant(1.0)] * 3, [5, 4]), ValueError, "non-decreasing"),
    ],
)
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
