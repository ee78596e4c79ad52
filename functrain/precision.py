"""Precision policies and the dynamic loss scale for fp16 (``torch.amp.GradScaler`` semantics).

Parameters stay fp32 ("master weights"); a policy only picks the autocast dtype of the forward
and backward. fp16 needs a loss scale: the loss is multiplied by ``scale`` before the backward so
small gradients do not underflow, gradients are multiplied back by ``1 / scale``, and a step whose
gradients are not finite is skipped while the scale backs off. Everything is a tensor op: no
``.item()``, so it compiles into the step and never syncs the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import tree


class Policy(NamedTuple):
    """How a step computes: ``compute_dtype`` for autocast (``None``: no autocast)."""

    name: str
    compute_dtype: torch.dtype | None
    use_loss_scale: bool


_POLICIES = {
    "fp32": Policy("fp32", None, False),
    "bf16": Policy("bf16", torch.bfloat16, False),
    "fp16": Policy("fp16", torch.float16, True),
}


def get_policy(name: str) -> Policy:
    """The policy called ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    if isinstance(name, Policy):
        return name
    if name not in _POLICIES:
        raise ValueError(f"precision must be one of {sorted(_POLICIES)}, got {name!r}")
    return _POLICIES[name]


class DynamicScale(NamedTuple):
    """The fp16 loss scale, a pytree of 0-d tensors kept in ``TrainState.loss_scale``.

    ``scale`` (fp32) and ``growth_tracker`` (int64, finite steps since the last change) are the
    state; the three hyperparameters ride along as 0-d tensors so a checkpoint restores them and
    a compiled step never specializes on them.
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    growth_factor: torch.Tensor
    backoff_factor: torch.Tensor
    growth_interval: torch.Tensor


def dynamic_scale_init(init_scale: float = 65536.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                       growth_interval: int = 2000, device=None) -> DynamicScale:
    """A fresh loss scale; defaults are ``torch.amp.GradScaler``'s."""
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if not growth_factor > 1.0:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
    if not (isinstance(growth_interval, int) and growth_interval > 0):
        raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
    f32 = dict(dtype=torch.float32, device=device)
    return DynamicScale(
        scale=torch.tensor(init_scale, **f32),
        growth_tracker=torch.zeros((), dtype=torch.int64, device=device),
        growth_factor=torch.tensor(growth_factor, **f32),
        backoff_factor=torch.tensor(backoff_factor, **f32),
        growth_interval=torch.tensor(growth_interval, dtype=torch.int64, device=device),
    )


def dynamic_scale_update(ds: DynamicScale, finite: torch.Tensor) -> DynamicScale:
    """The scale after a step whose unscaled gradients were ``finite`` (a 0-d bool tensor).

    As ``torch._amp_update_scale_``: on a non-finite step the scale is multiplied by
    ``backoff_factor`` and the tracker reset; otherwise the tracker counts up and, on reaching
    ``growth_interval``, the scale grows by ``growth_factor`` (only if the result is finite) and
    the tracker resets.
    """
    tracker = ds.growth_tracker + 1
    grow = finite & (tracker >= ds.growth_interval)
    grown = ds.scale * ds.growth_factor
    grown = torch.where(torch.isfinite(grown), grown, ds.scale)
    scale = torch.where(finite, torch.where(grow, grown, ds.scale), ds.scale * ds.backoff_factor)
    tracker = torch.where(finite & ~grow, tracker, torch.zeros_like(tracker))
    return ds._replace(scale=scale, growth_tracker=tracker)


def unscale(grads, ds: DynamicScale):
    """Gradients divided by the loss scale (multiplied by its fp32 reciprocal, as GradScaler)."""
    inv = ds.scale.double().reciprocal().float()
    return tree.scale(grads, inv)
