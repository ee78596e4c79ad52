"""AdamW through torch's fused kernel, in place: the eager fast path of a donated step.

:func:`functrain.optim.adamw` is a chain of transforms (Adam's moments, decoupled weight decay,
the learning rate). Out of place and eager, that is about ten passes over the state per step,
each allocating. ``torch.optim.AdamW(fused=True)`` (HF's default optimizer) runs the whole update as
``torch._fused_adamw_``: a few passes, in place, and it takes a ``found_inf`` flag (GradScaler's
skip), read on the device, with which it leaves params and moments unchanged. A donated eager step
may write its update in place, so for the plain ``adamw`` chain it calls that kernel with the
chain's own state: the same numbers as ``torch.optim.AdamW(fused=True)``, within float rounding of
the chain (``tests/test_step_fused_adamw.py``), and a skipped non-finite step costs nothing.

:func:`functrain.optim.adamw` records its settings on the transformation it returns
(:func:`declare_fused_adamw`); :func:`fused_adamw_of` reads them back: only an unwrapped ``adamw``
with number hyperparameters (not tensors, not amsgrad) has them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .. import tree
from .base import GradientTransformation, safe_increment
from .combine import mask_flags
from .transforms import ScaleByAdamState, ScaleByLearningRateState

__all__ = ["FusedAdamW", "declare_fused_adamw", "fused_adamw_", "fused_adamw_of", "fused_adamw_applies"]

# The devices torch's fused optimizer kernels support (torch.optim reads the same list).
try:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices as _fused_devices
except ImportError:  # an older torch: CPU (torch >= 2.4) and CUDA
    def _fused_devices():
        return ["cpu", "cuda"]


class FusedAdamW(NamedTuple):
    """What the fused kernel needs from an ``adamw`` chain besides its state."""

    b1: float
    b2: float
    eps: float
    weight_decay: float
    mask: Any  # which parameters decay (pytree of bools or a function of the params); None: all
    learning_rate: GradientTransformation  # the chain's scale_by_learning_rate (the schedule, its state)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def declare_fused_adamw(tx: GradientTransformation, *, b1, b2, eps, weight_decay, mask, amsgrad,
                        learning_rate: GradientTransformation) -> GradientTransformation:
    """Record on ``tx`` (an ``adamw`` chain) that its update may run as the fused kernel: only when
    every hyperparameter is a Python number (tensor ones belong to populations and
    ``inject_hyperparams``, which the kernel cannot read per member) and ``amsgrad`` is off."""
    if all(_number(x) for x in (b1, b2, eps, weight_decay)) and not amsgrad:
        tx.update.fused_adamw = FusedAdamW(float(b1), float(b2), float(eps), float(weight_decay), mask,
                                           learning_rate)
    return tx


def fused_adamw_of(tx) -> FusedAdamW | None:
    """The settings :func:`declare_fused_adamw` recorded on ``tx``, or ``None``."""
    return getattr(getattr(tx, "update", None), "fused_adamw", None)


def _plain(x) -> bool:
    # Parameters and plain tensors only: DTensor shards, functorch-batched or fake tensors go the slow way.
    return type(x) in (torch.Tensor, nn.Parameter) and x.is_floating_point() and not x.is_complex()


def fused_adamw_applies(params: dict, grads: dict, opt_state) -> bool:
    """Whether the kernel can run on these tensors: the chain's state layout, plain floating tensors,
    each parameter's gradient and moments of its dtype and device, a device the kernel supports."""
    if not hasattr(torch, "_fused_adamw_") or torch.compiler.is_compiling():
        return False
    if not (isinstance(opt_state, tuple) and len(opt_state) == 3 and isinstance(opt_state[0], ScaleByAdamState)
            and isinstance(opt_state[2], ScaleByLearningRateState) and opt_state[0].nu_max == ()):
        return False
    ps, gs = tree.leaves(params), tree.leaves(grads)
    mus, nus = tree.leaves(opt_state[0].mu), tree.leaves(opt_state[0].nu)
    if not ps or not len(ps) == len(gs) == len(mus) == len(nus):
        return False
    devices = _fused_devices()
    # (Gradients may be views: the caller passes dense copies of those; the state is written in place.)
    return all(p.device.type in devices and all(_plain(x) and x.dtype == p.dtype and x.device == p.device
                                                 for x in (p, g, m, v))
               and p.is_contiguous() and m.is_contiguous() and v.is_contiguous()
               for p, g, m, v in zip(ps, gs, mus, nus))


def fused_adamw_(spec: FusedAdamW, params, grads, opt_state, *, finite: torch.Tensor | None = None) -> None:
    """One AdamW step IN PLACE on ``params`` and ``opt_state`` (``(ScaleByAdamState, decay state,
    ScaleByLearningRateState)``, as ``adamw`` builds it), with the learning rate of the chain's schedule.

    ``finite``: a 0-d bool; where False nothing changes (params, moments, counts, the recorded
    learning rate), decided inside the kernel on the device. Check :func:`fused_adamw_applies` first.
    """
    adam, _, lr_state = opt_state
    count = safe_increment(adam.count)
    _, next_lr_state = spec.learning_rate.update({}, lr_state)  # this step's rate, from the chain's own schedule
    step = count.to(torch.float32)  # the kernel's bias corrections read a float step per tensor
    found_inf = None if finite is None else (~finite).to(torch.float32)
    decays = [True] * len(tree.leaves(params)) if spec.mask is None else mask_flags(spec.mask, params)
    groups: dict[tuple, list[tuple]] = {}
    for p, g, m, v, d in zip(tree.leaves(params), tree.leaves(grads), tree.leaves(adam.mu), tree.leaves(adam.nu),
                             decays):
        groups.setdefault((p.device, p.dtype, d and spec.weight_decay != 0), []).append((p, g, m, v))
    with torch.no_grad():
        for (device, _, decayed), group in groups.items():
            ps, gs, ms, vs = (list(t) for t in zip(*group))
            torch._fused_adamw_(ps, gs, ms, vs, [], [_on(step, device)] * len(ps), lr=_on(next_lr_state.learning_rate, device),
                                beta1=spec.b1, beta2=spec.b2, weight_decay=spec.weight_decay if decayed else 0.0,
                                eps=spec.eps, amsgrad=False, maximize=False,
                                found_inf=None if found_inf is None else _on(found_inf, device))
        _keep_or_write(finite, (adam.count, lr_state.count, lr_state.learning_rate),
                       (count, next_lr_state.count, next_lr_state.learning_rate))


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


def _keep_or_write(finite, olds: tuple, news: tuple) -> None:
    """Write each 0-d ``new`` into its ``old``, or (``finite`` False) keep the old value."""
    for old, new in zip(olds, news):
        old.copy_(new if finite is None else torch.where(finite, new, old))
