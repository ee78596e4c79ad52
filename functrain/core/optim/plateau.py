"""Reduce the step size when a monitored value stops improving (optax ``contrib.reduce_on_plateau``).

A pure transformation: its state holds the scale, the best value and the patience / cooldown
counters as 0-d tensors, so it checkpoints, compiles and vmaps like any other state. Two ways to
feed it the monitored value:

* ``observe="update"`` (optax): every ``update(..., value=loss)`` call contributes; after
  ``accumulation_size`` calls their mean is compared with the best so far. The train step passes
  ``value=loss``, so this follows the training loss.
* ``observe="external"``: updates only apply the scale; the driver feeds a value (an evaluation
  metric) with :func:`observe_plateau`, a pure function of the optimizer state. The Trainer's
  ``lr_scheduler_type="reduce_lr_on_plateau"`` does this after each evaluation, as HF steps
  ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

Semantics are optax's: the scale is multiplied by ``factor`` when the count of values without
improvement reaches ``patience`` (torch's ``patience=p`` is ``patience=p + 1`` here), never below
``min_scale``; after a reduction ``cooldown`` values are ignored. An improvement is
``value < best * (1 - rtol) - atol`` (``mode="min"``) or ``value > best * (1 + rtol) + atol``
(``mode="max"``, an addition to optax matching torch's ``mode="max"``). NaN never improves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.core import tree
from functrain.core.optim.base import GradientTransformationExtraArgs, counter_like

OBSERVE_MODES = ("update", "external")


class ReduceLROnPlateauState(NamedTuple):
    scale: torch.Tensor  # multiplies every update, 0-d fp32
    best_value: torch.Tensor  # best (averaged) value seen, 0-d fp32
    plateau_count: torch.Tensor  # values seen without improvement since the last reset, 0-d int64
    cooldown_count: torch.Tensor  # values still to ignore after a reduction, 0-d int64
    count: torch.Tensor  # values accumulated towards the next comparison, 0-d int64
    avg_value: torch.Tensor  # their running mean, 0-d fp32

    # (find_learning_rate multiplies the logged learning rate by ``scale``)
    scales_learning_rate = True


def _check(factor, patience, rtol, atol, cooldown, accumulation_size, min_scale, mode, observe):
    if not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_on_plateau: factor must be in (0, 1), got {factor}")
    for name, v, low in (("patience", patience, 0), ("cooldown", cooldown, 0), ("accumulation_size", accumulation_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"reduce_on_plateau: {name} must be an int >= {low}, got {v!r}")
    if rtol < 0 or atol < 0 or min_scale < 0:
        raise ValueError(f"reduce_on_plateau: rtol, atol and min_scale must be >= 0, got {rtol}, {atol}, {min_scale}")
    if mode not in ("min", "max"):
        raise ValueError(f"reduce_on_plateau: mode must be 'min' or 'max', got {mode!r}")
    if observe not in OBSERVE_MODES:
        raise ValueError(f"reduce_on_plateau: observe must be one of {OBSERVE_MODES}, got {observe!r}")


def reduce_on_plateau(factor: float = 0.1, patience: int = 10, rtol: float = 1e-4, atol: float = 0.0,
                      cooldown: int = 0, accumulation_size: int = 1, min_scale: float = 0.0, *,
                      mode: str = "min", min_scale_change: float = 0.0,
                      observe: str = "update") -> GradientTransformationExtraArgs:
    """Multiply updates by a scale that drops by ``factor`` on plateaus (see the module docstring).

    ``min_scale_change``: a reduction smaller than this is skipped (torch's ``eps / lr``).
    """
    _check(factor, patience, rtol, atol, cooldown, accumulation_size, min_scale, mode, observe)
    params = dict(factor=factor, patience=patience, rtol=rtol, atol=atol, cooldown=cooldown,
                  accumulation_size=accumulation_size, min_scale=min_scale, mode=mode,
                  min_scale_change=min_scale_change)

    def init(params_tree):
        device = counter_like(params_tree).device
        zero = torch.zeros((), dtype=torch.int64, device=device)
        best = float("inf") if mode == "min" else float("-inf")
        f32 = dict(dtype=torch.float32, device=device)
        return ReduceLROnPlateauState(torch.ones((), **f32), torch.full((), best, **f32), zero, zero.clone(),
                                      zero.clone(), torch.zeros((), **f32))

    def update(updates, state, params_tree=None, *, value=None, **extra_args):
        if observe == "update":
            if value is None:
                raise ValueError("reduce_on_plateau(observe='update') needs update(..., value=loss); the train "
                                 "step passes it. For an evaluation metric use observe='external'")
            state = _observe(state, value, **params)
        return tree.scale(updates, state.scale), state

    return GradientTransformationExtraArgs(init, update)


def _observe(state: ReduceLROnPlateauState, value, *, factor, patience, rtol, atol, cooldown, accumulation_size,
             min_scale, mode, min_scale_change) -> ReduceLROnPlateauState:
    """One value into the state: optax's accumulate-then-compare, branch-free."""
    value = torch.as_tensor(value, dtype=torch.float32, device=state.avg_value.device).reshape(())
    count = state.count + 1
    avg = (state.count.float() * state.avg_value + value) / count.float()
    compare = count >= accumulation_size
    if mode == "min":
        improved = avg < state.best_value * (1 - rtol) - atol
    else:
        improved = avg > state.best_value * (1 + rtol) + atol
    best = torch.where(improved, avg, state.best_value)
    plateau = torch.where(improved, torch.zeros_like(state.plateau_count), state.plateau_count + 1)
    in_cooldown = state.cooldown_count > 0
    reduce = ~in_cooldown & (plateau == patience)
    reduced = torch.clamp(state.scale * factor, min=min_scale)
    scale = torch.where(reduce & (state.scale - reduced > min_scale_change), reduced, state.scale)
    plateau = torch.where(in_cooldown | reduce, torch.zeros_like(plateau), plateau)
    cooldown_count = torch.where(in_cooldown, state.cooldown_count - 1,
                                 torch.where(reduce, torch.full_like(plateau, cooldown), torch.zeros_like(plateau)))
    compared = ReduceLROnPlateauState(scale, best, plateau, cooldown_count, torch.zeros_like(count),
                                      torch.zeros_like(avg))
    accumulated = state._replace(count=count, avg_value=avg)
    return ReduceLROnPlateauState(*(torch.where(compare, c, a) for c, a in zip(compared, accumulated)))


def observe_plateau(opt_state: Any, value, factor: float = 0.1, patience: int = 10, rtol: float = 1e-4,
                    atol: float = 0.0, cooldown: int = 0, accumulation_size: int = 1, min_scale: float = 0.0, *,
                    mode: str = "min", min_scale_change: float = 0.0) -> Any:
    """``opt_state`` with ``value`` fed to every :class:`ReduceLROnPlateauState` in it (pure).

    Pass the arguments the ``reduce_on_plateau(observe="external")`` transformation was built
    with. The result has the same structure, dtypes and devices, so a compiled step keeps running
    without recompiling.
    """
    _check(factor, patience, rtol, atol, cooldown, accumulation_size, min_scale, mode, "external")
    settings = dict(factor=factor, patience=patience, rtol=rtol, atol=atol, cooldown=cooldown,
                    accumulation_size=accumulation_size, min_scale=min_scale, mode=mode,
                    min_scale_change=min_scale_change)
    found = []

    def visit(node):
        if isinstance(node, ReduceLROnPlateauState):
            found.append(True)
            return _observe(node, value, **settings)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(visit(x) for x in node))
        if isinstance(node, (tuple, list)):
            return type(node)(visit(x) for x in node)
        if isinstance(node, dict):
            return type(node)((k, visit(v)) for k, v in node.items())
        return node

    out = visit(opt_state)
    if not found:
        raise ValueError("observe_plateau: the optimizer state holds no reduce_on_plateau state; chain "
                         "optim.reduce_on_plateau(observe='external') into the optimizer")
    return out


TORCH_ARGUMENTS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")


def plateau_arguments_from_torch(learning_rate: float, *, mode: str = "min", factor: float = 0.1, patience: int = 10,
                                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                                 min_lr: float = 0.0, eps: float = 1e-8) -> dict:
    """``reduce_on_plateau`` arguments that reproduce ``torch.optim.lr_scheduler.ReduceLROnPlateau``
    with these arguments (HF's ``lr_scheduler_kwargs``) on a learning rate ``learning_rate``.

    torch reduces after ``patience`` bad values *beyond* the first (so ``patience + 1`` here) and
    floors the rate at ``min_lr`` (``min_scale = min_lr / learning_rate``); a reduction smaller
    than ``eps`` is skipped (``min_scale_change = eps / learning_rate``).
    """
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"reduce_lr_on_plateau: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
    if isinstance(min_lr, (list, tuple)):
        raise ValueError("reduce_lr_on_plateau: min_lr must be one number (functrain has one parameter group)")
    if learning_rate <= 0:
        raise ValueError(f"reduce_lr_on_plateau needs a learning rate > 0, got {learning_rate}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"reduce_lr_on_plateau: patience must be an int >= 0, got {patience!r}")
    rel = threshold_mode == "rel"
    return dict(factor=factor, patience=patience + 1, rtol=threshold if rel else 0.0, atol=0.0 if rel else threshold,
                cooldown=cooldown, min_scale=min_lr / learning_rate, mode=mode, min_scale_change=eps / learning_rate)
