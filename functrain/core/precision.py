"""Mixed precision: the compute-dtype policy and the dynamic loss scale for fp16, as pure functions.

``DynamicScale`` is the state of ``torch.amp.GradScaler`` as a pytree of 0-d tensors, and
:func:`dynamic_scale_update` is ``GradScaler.update`` written with ``torch.where``: no ``.item()``,
no host sync, no Python branch on a tensor, so it lives inside a compiled step. A step does::

    loss = scale_loss(loss, ds)                    # before the backward
    grads = unscale(grads, ds)                     # after the backward
    finite = tree.all_finite(grads)
    new_params = tree.where(finite, updated_params, params)   # skip the update on inf/nan
    ds = dynamic_scale_update(ds, finite)

The hyperparameters (``growth_factor``, ``backoff_factor``, ``growth_interval``) are stored in
the tuple as 0-d tensors rather than kept static: they are saved and restored with the state (as
``GradScaler.state_dict`` does) and changing them never recompiles a step.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from functrain.core import tree


class DynamicScale(NamedTuple):
    """The loss-scale state of ``torch.amp.GradScaler``, as 0-d tensors.

    Fields:
        scale: fp32, the factor the loss is multiplied by before the backward.
        growth_tracker: int32, consecutive steps with finite gradients since the last change.
        growth_factor: fp32, ``scale`` is multiplied by it after ``growth_interval`` finite steps.
        backoff_factor: fp32, ``scale`` is multiplied by it after a step with inf/nan gradients.
        growth_interval: int32, the number of finite steps between two growths.
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    growth_factor: torch.Tensor
    backoff_factor: torch.Tensor
    growth_interval: torch.Tensor


def dynamic_scale_init(
    init_scale: float = 65536.0,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    device=None,
) -> DynamicScale:
    """A fresh loss scale with ``torch.amp.GradScaler``'s defaults and checks."""
    _check_number("init_scale", init_scale, lambda v: v > 0, "> 0")
    _check_number("growth_factor", growth_factor, lambda v: v > 1.0, "> 1.0")
    _check_number("backoff_factor", backoff_factor, lambda v: 0.0 < v < 1.0, "in (0, 1)")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval <= 0:
        raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")

    def f32(v):
        return torch.tensor(float(v), dtype=torch.float32, device=device)

    def i32(v):
        return torch.tensor(int(v), dtype=torch.int32, device=device)

    return DynamicScale(f32(init_scale), i32(0), f32(growth_factor), f32(backoff_factor), i32(growth_interval))


def _check_number(name, value, ok, expected):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"{name} must be a number {expected}, got {value!r}")


def dynamic_scale_update(ds: DynamicScale, finite: torch.Tensor) -> DynamicScale:
    """The scale after a step whose gradients were all finite (``finite``, a 0-d bool) or not.

    Same rule as ``torch._amp_update_scale_``: on inf/nan, ``scale *= backoff_factor`` and the
    tracker resets; otherwise the tracker counts up, and when it reaches ``growth_interval`` the
    scale grows by ``growth_factor`` (unless that overflows fp32) and the tracker resets.
    """
    if not isinstance(ds, DynamicScale):
        raise TypeError(f"ds must be a DynamicScale, got {type(ds).__name__}")
    if not isinstance(finite, torch.Tensor) or finite.ndim != 0:
        raise TypeError(f"finite must be a 0-d bool tensor (e.g. tree.all_finite(grads)), got {finite!r}")
    finite = finite.to(device=ds.scale.device, dtype=torch.bool)
    successful = ds.growth_tracker + 1
    # torch tests ``==``; ``>=`` is the same on every reachable state and still grows if a
    # restored state has a tracker past a (lowered) interval.
    grow = successful >= ds.growth_interval
    grown = ds.scale * ds.growth_factor
    grown = torch.where(torch.isfinite(grown), grown, ds.scale)
    scale_if_finite = torch.where(grow, grown, ds.scale)
    tracker_if_finite = torch.where(grow, torch.zeros_like(successful), successful)
    return ds._replace(
        scale=torch.where(finite, scale_if_finite, ds.scale * ds.backoff_factor),
        growth_tracker=torch.where(finite, tracker_if_finite, torch.zeros_like(successful)),
    )


def scale_loss(loss: torch.Tensor, ds: DynamicScale | None) -> torch.Tensor:
    """``loss * scale`` (``loss`` unchanged when ``ds`` is None), as ``GradScaler.scale``."""
    if ds is None:
        return loss
    return loss * ds.scale.to(loss.device)


def unscale(grads, ds: DynamicScale | None):
    """Divide every gradient by the scale (each leaf keeps its dtype), as ``GradScaler.unscale_``.

    Like GradScaler, the reciprocal is taken in fp64 then rounded to fp32, and leaves are
    multiplied by it. Out of place; returns ``grads`` unchanged when ``ds`` is None.
    """
    if ds is None:
        return grads
    inv_scale = ds.scale.double().reciprocal().float()
    return tree.scale(grads, inv_scale)


# -- policy --------------------------------------------------------------------------------------


class Policy(NamedTuple):
    """What a mixed-precision mode means for a step.

    Fields:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        compute_dtype: the ``torch.autocast`` dtype of the forward, or ``None`` for plain fp32.
        needs_loss_scale: whether gradients need a :class:`DynamicScale` (fp16 only: its narrow
            exponent range underflows small gradients; bf16 has fp32's range).

    Parameters and optimizer state stay in their own dtype (fp32 master weights); only the
    forward and backward run in ``compute_dtype``.
    """

    name: str
    compute_dtype: torch.dtype | None
    needs_loss_scale: bool

    def autocast(self, device_type: str = "cpu"):
        """A context running the forward in ``compute_dtype`` (a no-op context for fp32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)


_POLICIES = {
    "fp32": Policy("fp32", None, False),
    "bf16": Policy("bf16", torch.bfloat16, False),
    "fp16": Policy("fp16", torch.float16, True),
}
# Accelerate's ``mixed_precision="no"`` and the dtype names mean the same thing.
_ALIASES = {"no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def get_policy(name: str | Policy) -> Policy:
    """The :class:`Policy` for ``"fp32"`` (alias ``"no"``), ``"bf16"`` or ``"fp16"``."""
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str):
        raise TypeError(f"precision must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _POLICIES:
        raise ValueError(
            f"unknown precision {name!r}; expected one of {sorted(_POLICIES)} (or aliases {sorted(_ALIASES)})"
        )
    return _POLICIES[key]
