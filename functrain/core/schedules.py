"""Learning-rate schedules as pure functions of the step, matching ``transformers.get_scheduler``.

A schedule is a callable ``schedule(step) -> learning rate``: the absolute rate (peak times the
multiplier that the matching Hugging Face ``LambdaLR`` would apply), for the update that follows
``step`` updates already done (the optimizer's update count, as ``scale_by_learning_rate`` passes
it). Each constructor here takes the peak rate and the schedule's settings and returns one::

    lr = linear(3e-4, num_warmup_steps=100, num_training_steps=10_000)
    lr(0), lr(100), lr(torch.tensor(5_000))

The step may be

* a Python ``int``: the result is a Python ``float`` (handy for logging, no tensor made);
* a 0-d tensor (integer or floating dtype): the result is a 0-d **float32** tensor on the step's
  device, computed with torch ops only (no ``.item()``, no Python branch on the value), so a step
  compiled with ``torch.compile`` follows the schedule without recompiling as the step changes.

Both paths share one implementation that computes in float64, so an ``int`` step reproduces the
Hugging Face value to ~1e-16 and a tensor step to float32 rounding. (float64 rules out devices
without it, such as Apple's MPS.)

``reduce_lr_on_plateau`` depends on evaluation metrics, not on the step: it is the pure
transformation :func:`functrain.optim.reduce_on_plateau`, fed by the driver.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Schedule = Callable[[int | torch.Tensor], float | torch.Tensor]

_F64 = torch.float64


# -- evaluation helpers --------------------------------------------------------------------------


def _evaluate(step, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Run ``fn`` on the step as a float64 tensor; return a float for an int, fp32 for a tensor."""
    if isinstance(step, torch.Tensor):
        if step.ndim != 0:
            raise ValueError(f"a schedule's step must be an int or a 0-d tensor, got shape {tuple(step.shape)}")
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"a schedule's step must be an integer or floating tensor, got {step.dtype}")
        return fn(step.to(_F64)).to(torch.float32)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"a schedule's step must be an int or a 0-d tensor, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"a schedule's step must be >= 0, got {step}")
    return float(fn(torch.tensor(step, dtype=_F64)))


def _linear_warmup(s: torch.Tensor, num_warmup_steps: int, after: torch.Tensor) -> torch.Tensor:
    """HF's warmup: ``s / max(1, W)`` for ``s < W``, then ``after``."""
    return torch.where(s < num_warmup_steps, s / max(1, num_warmup_steps), after)


def _progress(s: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """How far ``s`` is into a phase of ``length`` steps starting at ``start`` (HF's ``progress``)."""
    return (s - start) / max(1, length)


def _half_cosine(progress: torch.Tensor, num_cycles: float) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * float(num_cycles) * 2.0 * progress))


# -- argument checks -----------------------------------------------------------------------------


def _check_peak(peak) -> float:
    if isinstance(peak, bool) or not isinstance(peak, (int, float)):
        raise TypeError(f"peak learning rate must be a number, got {type(peak).__name__}")
    if not math.isfinite(peak) or peak < 0:
        raise ValueError(f"peak learning rate must be a finite number >= 0, got {peak}")
    return float(peak)


def _check_steps(name: str, value, *, allow_none=False, positive=False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < (1 if positive else 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# -- the schedules -------------------------------------------------------------------------------


def constant(peak: float) -> Schedule:
    """``peak`` at every step (HF ``"constant"``)."""
    peak = _check_peak(peak)
    return lambda step: _evaluate(step, lambda s: torch.full_like(s, peak))


def constant_with_warmup(peak: float, num_warmup_steps: int) -> Schedule:
    """Linear warmup from 0 to ``peak`` over ``num_warmup_steps``, then constant."""
    peak, w = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps)
    return lambda step: _evaluate(step, lambda s: peak * _linear_warmup(s, w, torch.ones_like(s)))


def linear(peak: float, num_warmup_steps: int, num_training_steps: int) -> Schedule:
    """Linear warmup to ``peak``, then linear decay to 0 at ``num_training_steps`` (HF default)."""
    peak, w, t = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps), _check_steps(
        "num_training_steps", num_training_steps
    )

    def multiplier(s):
        return _linear_warmup(s, w, ((t - s) / max(1, t - w)).clamp_min(0.0))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def cosine(peak: float, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> Schedule:
    """Linear warmup, then cosine from ``peak`` to 0 (``num_cycles=0.5``: one half-wave)."""
    peak, w, t = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps), _check_steps(
        "num_training_steps", num_training_steps
    )

    def multiplier(s):
        return _linear_warmup(s, w, _half_cosine(_progress(s, w, t - w), num_cycles).clamp_min(0.0))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def warmup_cosine(peak: float, warmup: int, total: int) -> Schedule:
    """Short name for ``cosine(peak, num_warmup_steps=warmup, num_training_steps=total)``."""
    return cosine(peak, warmup, total)


def cosine_with_restarts(peak: float, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1) -> Schedule:
    """Linear warmup, then ``num_cycles`` cosine decays from ``peak`` to 0 with hard restarts."""
    peak, w, t = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps), _check_steps(
        "num_training_steps", num_training_steps
    )

    def multiplier(s):
        progress = _progress(s, w, t - w)
        wave = 0.5 * (1.0 + torch.cos(math.pi * torch.remainder(float(num_cycles) * progress, 1.0)))
        return _linear_warmup(s, w, torch.where(progress >= 1.0, 0.0, wave.clamp_min(0.0)))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def polynomial(
    peak: float, num_warmup_steps: int, num_training_steps: int, lr_end: float = 1e-7, power: float = 1.0
) -> Schedule:
    """Linear warmup, then ``(peak - lr_end) * remaining**power + lr_end``; ``lr_end`` after the end."""
    peak, w, t = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps), _check_steps(
        "num_training_steps", num_training_steps
    )
    if not peak > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than the peak learning rate ({peak})")

    def lr(s):
        # HF divides by ``t - w`` unguarded (ZeroDivisionError when equal); max(1, .) avoids nan.
        remaining = (1.0 - (s - w) / max(1, t - w)).clamp_min(0.0)
        decay = (peak - lr_end) * remaining**power + lr_end
        after = torch.where(s > t, torch.full_like(s, lr_end), decay)
        return torch.where(s < w, peak * s / max(1, w), after)

    return lambda step: _evaluate(step, lr)


def inverse_sqrt(peak: float, num_warmup_steps: int, timescale: int | None = None) -> Schedule:
    """Linear warmup, then ``peak / sqrt((step + timescale - W) / timescale)``.

    ``timescale`` defaults to ``num_warmup_steps`` (or 10,000 without warmup), as in HF.
    """
    peak, w = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps)
    if timescale is None:
        timescale = w or 10_000
    timescale = _check_steps("timescale", timescale, positive=True)
    shift = timescale - w

    def multiplier(s):
        return _linear_warmup(s, w, 1.0 / torch.sqrt(((s + shift) / timescale).clamp_min(0.0)))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def _min_lr_rate(peak: float, min_lr, min_lr_rate) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("give only one of min_lr or min_lr_rate, not both")
    if min_lr is None and min_lr_rate is None:
        raise ValueError("cosine_with_min_lr needs min_lr (absolute) or min_lr_rate (fraction of peak)")
    if min_lr is not None:
        if peak == 0:
            raise ValueError("min_lr needs a peak learning rate > 0; use min_lr_rate")
        return float(min_lr) / peak
    return float(min_lr_rate)


def _min_lr_cosine_args(peak, num_warmup_steps, num_training_steps, min_lr, min_lr_rate):
    """The checked ``(peak, warmup, total, min rate)`` of the two cosine-with-floor schedules."""
    peak = _check_peak(peak)
    w = _check_steps("num_warmup_steps", num_warmup_steps)
    t = _check_steps("num_training_steps", num_training_steps)
    return peak, w, t, _min_lr_rate(peak, min_lr, min_lr_rate)


def cosine_with_min_lr(peak: float, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5,
                       min_lr: float | None = None, min_lr_rate: float | None = None) -> Schedule:
    """Linear warmup, then cosine from ``peak`` down to ``min_lr`` (or ``min_lr_rate * peak``)."""
    peak, w, t, rate = _min_lr_cosine_args(peak, num_warmup_steps, num_training_steps, min_lr, min_lr_rate)

    def multiplier(s):
        factor = _half_cosine(_progress(s, w, t - w), num_cycles) * (1 - rate) + rate
        return _linear_warmup(s, w, factor.clamp_min(0.0))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def cosine_warmup_with_min_lr(peak: float, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5,
                              min_lr: float | None = None, min_lr_rate: float | None = None,
                              warmup_lr_rate: float | None = None) -> Schedule:
    """HF ``"cosine_warmup_with_min_lr"``: like :func:`cosine_with_min_lr`, shifted by one step.

    The warmup starts at ``1/W`` of peak (or ``warmup_lr_rate``) rather than 0 and reaches the peak
    at step ``W - 1``; the cosine is one step further along than in ``cosine_with_min_lr``.
    """
    peak, w, t, rate = _min_lr_cosine_args(peak, num_warmup_steps, num_training_steps, min_lr, min_lr_rate)

    def multiplier(s):
        if warmup_lr_rate is None:
            warm = (s + 1.0) / max(1.0, w)
        else:
            wr = float(warmup_lr_rate)
            warm = wr + (1.0 - wr) * s / max(1, w - 1)
        progress = (s - w + 1.0) / max(1.0, t - w)
        factor = _half_cosine(progress, num_cycles) * (1 - rate) + rate
        return torch.where(s < w, warm, factor.clamp_min(0.0))

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(
    peak: float,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> Schedule:
    """Warmup (from ``min_lr_ratio * peak``), stable at ``peak``, decay back to ``min_lr_ratio * peak``.

    ``num_stable_steps`` defaults to ``num_training_steps - num_warmup_steps - num_decay_steps``;
    when given it wins (HF warns if both are given). Past the decay the rate stays at the minimum.
    ``warmup_type`` and ``decay_type`` are ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
    """
    peak, w = _check_peak(peak), _check_steps("num_warmup_steps", num_warmup_steps)
    d = _check_steps("num_decay_steps", num_decay_steps)
    if num_stable_steps is None:
        if num_training_steps is None:
            raise ValueError("warmup_stable_decay needs num_training_steps or num_stable_steps")
        num_stable_steps = _check_steps("num_training_steps", num_training_steps) - w - d
        if num_stable_steps < 0:
            raise ValueError(
                f"num_warmup_steps ({w}) + num_decay_steps ({d}) exceed num_training_steps ({num_training_steps})"
            )
    st = _check_steps("num_stable_steps", num_stable_steps)
    for name, kind in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if kind not in _WSD_SHAPES:
            raise ValueError(f"unknown {name} {kind!r}, expected one of {list(_WSD_SHAPES)}")
    r = _check_ratio("min_lr_ratio", min_lr_ratio)

    def rise(p):
        if warmup_type == "linear":
            return p
        if warmup_type == "cosine":
            return 0.5 * (1.0 - torch.cos(math.pi * p))
        return 1.0 - torch.sqrt((1.0 - p).clamp_min(0.0))

    def fall(p):
        if decay_type == "linear":
            return 1.0 - p
        if decay_type == "cosine":
            return _half_cosine(p, num_cycles)
        return 1.0 - torch.sqrt(p.clamp_min(0.0))

    def multiplier(s):
        warm = (rise(_progress(s, 0, w)) * (1.0 - r) + r).clamp_min(0.0)
        decay = (fall(_progress(s, w + st, d)) * (1.0 - r) + r).clamp_min(0.0)
        out = torch.where(s < w + st + d, decay, torch.full_like(s, r))
        out = torch.where(s < w + st, torch.ones_like(s), out)
        return torch.where(s < w, warm, out)

    return lambda step: _evaluate(step, lambda s: peak * multiplier(s))


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` from step 0, and so on.

    As ``optax.join_schedules``: from ``boundaries[i-1]`` on, the result is
    ``schedules[i](step - boundaries[i-1])``. Needs ``len(boundaries) == len(schedules) - 1``.
    """
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        raise ValueError("join_schedules needs at least one schedule")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules needs len(boundaries) == len(schedules) - 1, got {len(boundaries)} boundaries "
            f"for {len(schedules)} schedules"
        )
    for i, b in enumerate(boundaries):
        _check_steps(f"boundaries[{i}]", b)
    if any(b1 > b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be non-decreasing, got {boundaries}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] is not callable: {s!r}")

    def schedule(step):
        if not isinstance(step, torch.Tensor):
            _check_steps("step", step)
            i = sum(step >= b for b in boundaries)  # how many boundaries are behind us
            return schedules[i](step - (boundaries[i - 1] if i else 0))
        # Branch-free for tensors: evaluate every piece, keep the one whose interval holds step.
        out = torch.as_tensor(schedules[0](step), dtype=torch.float32, device=step.device)
        for boundary, piece in zip(boundaries, schedules[1:]):
            value = torch.as_tensor(piece(step - boundary), dtype=torch.float32, device=step.device)
            out = torch.where(step < boundary, out, value)
        return out

    return schedule


# -- by Hugging Face name ------------------------------------------------------------------------

# HF SchedulerType value -> (constructor, does it take num_training_steps?)
_BY_NAME: dict[str, tuple[Callable[..., Schedule], bool]] = {
    "linear": (linear, True),
    "cosine": (cosine, True),
    "cosine_with_restarts": (cosine_with_restarts, True),
    "polynomial": (polynomial, True),
    "constant": (constant, False),
    "constant_with_warmup": (constant_with_warmup, False),
    "inverse_sqrt": (inverse_sqrt, False),
    "cosine_with_min_lr": (cosine_with_min_lr, True),
    "cosine_warmup_with_min_lr": (cosine_warmup_with_min_lr, True),
    "warmup_stable_decay": (warmup_stable_decay, True),
}
STEP_SCHEDULES: tuple[str, ...] = tuple(_BY_NAME)  # every name get_schedule accepts
# HF names that are not a function of the step; the driver handles them.
_NOT_STEP_FUNCTIONS = {
    "reduce_lr_on_plateau": "it depends on eval metrics: chain functrain.optim.reduce_on_plateau(observe='external') into "
                            "the optimizer and feed it with functrain.optim.observe_plateau (the Trainer does)",
    "greedy": "it depends on the training loss (not supported yet)",
}


def warmup_steps(
    num_training_steps: int, num_warmup_steps: int | float | None = None, warmup_ratio: float | None = None
) -> int:
    """The number of warmup steps as HF computes it: steps as given, or ``ceil(ratio * total)``.

    Like ``TrainingArguments.get_warmup_steps``, a ``num_warmup_steps`` below 1 given as a float is
    read as a ratio.
    """
    if num_warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("give num_warmup_steps or warmup_ratio, not both")
    if isinstance(num_warmup_steps, float) and 0 <= num_warmup_steps < 1:
        num_warmup_steps, warmup_ratio = None, num_warmup_steps
    if warmup_ratio is not None:
        return math.ceil(num_training_steps * _check_ratio("warmup_ratio", warmup_ratio))
    if num_warmup_steps is None:
        return 0
    if isinstance(num_warmup_steps, float) and num_warmup_steps.is_integer():
        num_warmup_steps = int(num_warmup_steps)
    return _check_steps("num_warmup_steps", num_warmup_steps)


def get_schedule(
    name: str,
    peak: float,
    *,
    num_training_steps: int,
    num_warmup_steps: int | float | None = None,
    warmup_ratio: float | None = None,
    **kwargs,
) -> Schedule:
    """The schedule for an HF ``lr_scheduler_type`` name, e.g. ``"linear"`` or ``"cosine_with_min_lr"``.

    ``kwargs`` are the scheduler's own settings (HF's ``lr_scheduler_kwargs``): ``num_cycles``,
    ``lr_end``/``power``, ``timescale``, ``min_lr``/``min_lr_rate``, ``num_decay_steps`` ... Warmup
    is given as steps or as a ratio of ``num_training_steps`` (``ceil``, as HF).
    """
    key = getattr(name, "value", name)  # accept transformers' SchedulerType enum too
    if not isinstance(key, str):
        raise TypeError(f"schedule name must be a string, got {type(name).__name__}")
    if key in _NOT_STEP_FUNCTIONS:
        raise ValueError(f"{key!r} is not a function of the step: {_NOT_STEP_FUNCTIONS[key]}")
    if key not in _BY_NAME:
        raise ValueError(f"unknown schedule {key!r}; known schedules are {sorted(_BY_NAME)}")
    peak = _check_peak(peak)
    num_training_steps = _check_steps("num_training_steps", num_training_steps)
    make, takes_total = _BY_NAME[key]
    if make is constant:
        if kwargs:
            raise TypeError(f"'constant' takes no schedule settings, got {sorted(kwargs)}")
        return constant(peak)
    w = warmup_steps(num_training_steps, num_warmup_steps, warmup_ratio)
    if takes_total:
        kwargs["num_training_steps"] = num_training_steps
    try:
        return make(peak, num_warmup_steps=w, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"schedule {key!r} got an unknown setting: {e}") from None
        raise
