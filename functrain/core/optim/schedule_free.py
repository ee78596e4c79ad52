"""Schedule-Free AdamW and SGD (Defazio et al. 2024), as the ``schedulefree`` package computes them.

The parameters in the train state are the ``y`` sequence (where gradients are taken); the state
keeps ``z`` (the base iterate). The averaged ``x`` sequence, which is what to evaluate and ship,
is ``(y - (1 - b1) z) / b1``: get it with :func:`schedule_free_eval_params` (optax's name). The
Trainer evaluates at ``x``, as HF's Trainer does by calling ``optimizer.eval()``.

Per update ``k`` (0-based): ``lr = learning_rate(k) * min(1, (k + 1) / warmup_steps)``,
``lr_max = max(lr_max, lr)``, ``w = (k + 1)**r * lr_max**weight_lr_power``, ``c = w / sum w``;
with ``d`` the preconditioned gradient plus ``weight_decay * y``:
``y <- lerp(y, z, c) + lr * (b1 * (1 - c) - 1) * d`` and ``z <- z - lr * d``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.core import foreach, tree
from functrain.core.optim.base import (
    require_params,
    EmptyState,
    GradientTransformation,
    as_hyperparam,
    chain,
    check_structure,
    counter_like,
    identity,
    safe_increment,
)
from functrain.core.optim.transforms import add_decayed_weights


class ScaleByBiasCorrectedRmsState(NamedTuple):
    count: torch.Tensor
    nu: tree.PyTree


def _scale_by_bias_corrected_rms(b2, eps) -> GradientTransformation:
    """``g / (sqrt(nu / (1 - b2**t)) + eps)``: Adam's denominator without the first moment."""

    def init(params):
        return ScaleByBiasCorrectedRmsState(counter_like(params), tree.zeros_like(params))

    def update(updates, state, params=None):
        g, treedef = tree.flatten(updates)
        count = safe_increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        nu = foreach.mul(tree.leaves(state.nu), b2)
        foreach.addcmul_(nu, g, g, value=1 - b2)
        bc2 = (1 - torch.pow(torch.as_tensor(b2, dtype=torch.float64), count.to(torch.float64))).float()
        denom = foreach.sqrt(foreach.div(nu, bc2))
        foreach.add_(denom, eps)
        return tree.unflatten(treedef, foreach.div(g, denom)), ScaleByBiasCorrectedRmsState(
            count, tree.unflatten(treedef, nu))

    return GradientTransformation(init, update)


class ScheduleFreeState(NamedTuple):
    count: torch.Tensor
    lr_max: torch.Tensor  # 0-d float64
    weight_sum: torch.Tensor  # 0-d float64
    z: tree.PyTree
    b1: torch.Tensor  # 0-d fp32, kept so schedule_free_eval_params needs no arguments
    learning_rate: torch.Tensor  # the rate of the last update before the warmup factor, 0-d fp32 (logged)


def schedule_free_step(learning_rate, b1=0.9, warmup_steps: int = 0, r=0.0, weight_lr_power=2.0) -> GradientTransformation:
    """The schedule-free interpolation of ``y`` and ``z`` for an already preconditioned direction."""
    learning_rate = as_hyperparam(learning_rate, "learning_rate", allow_schedule=True)
    b1 = as_hyperparam(b1, "b1")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"schedule_free: warmup_steps must be an int >= 0, got {warmup_steps!r}")

    def base_lr(count):
        lr = learning_rate(count) if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor) else learning_rate
        return torch.as_tensor(lr, dtype=torch.float64, device=count.device)

    def init(params):
        count = counter_like(params)
        f64 = dict(dtype=torch.float64, device=count.device)
        return ScheduleFreeState(count, torch.full((), -1.0, **f64), torch.zeros((), **f64), tree.clone(params),
                                 torch.as_tensor(b1, dtype=torch.float32, device=count.device).clone(),
                                 base_lr(count).float())

    def update(updates, state, params=None):
        require_params(params, "schedule_free")
        check_structure(updates, params)
        k1 = (state.count + 1).to(torch.float64)
        sched = torch.clamp(k1 / warmup_steps, max=1.0) if warmup_steps else torch.ones_like(k1)
        lr = base_lr(state.count) * sched
        lr_max = torch.maximum(state.lr_max, lr)
        weight = torch.pow(k1, r) * torch.pow(lr_max, weight_lr_power)
        weight_sum = state.weight_sum + weight
        ckp1 = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight))
        d, treedef = tree.flatten(updates)
        y, z = tree.leaves(params), tree.leaves(state.z)
        if not d:
            return updates, state._replace(count=safe_increment(state.count), lr_max=lr_max, weight_sum=weight_sum,
                                           learning_rate=base_lr(state.count).float())
        c = ckp1.float()
        step = (lr * (b1 * (1 - ckp1) - 1)).float()
        new_y = foreach.add(foreach.lerp(y, z, c), foreach.mul(d, step))
        new_z = foreach.sub(z, foreach.mul(d, lr.float()))
        out = foreach.sub(new_y, y)
        return tree.unflatten(treedef, out), ScheduleFreeState(safe_increment(state.count), lr_max, weight_sum,
                                                               tree.unflatten(treedef, new_z), state.b1,
                                                               base_lr(state.count).float())

    return GradientTransformation(init, update)


def _decay(weight_decay, mask):
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return identity()
    decay = add_decayed_weights(weight_decay)
    if mask is None:
        return decay
    from functrain.core.optim.combine import masked

    return masked(decay, mask)


def schedule_free_adamw(learning_rate=0.0025, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps: int = 0,
                        r=0.0, weight_lr_power=2.0, *, mask=None) -> GradientTransformation:
    """Schedule-Free AdamW matching ``schedulefree.AdamWScheduleFree`` (its defaults).

    ``learning_rate`` may also be a schedule (HF's Trainer applies its scheduler on top).
    """
    return chain(_scale_by_bias_corrected_rms(as_hyperparam(b2, "b2"), as_hyperparam(eps, "eps")),
                 _decay(weight_decay, mask), schedule_free_step(learning_rate, b1, warmup_steps, r, weight_lr_power))


def schedule_free_sgd(learning_rate=1.0, momentum=0.9, weight_decay=0.0, warmup_steps: int = 0, r=0.0,
                      weight_lr_power=2.0, *, mask=None) -> GradientTransformation:
    """Schedule-Free SGD matching ``schedulefree.SGDScheduleFree`` (``momentum`` is ``b1``)."""
    return chain(_decay(weight_decay, mask), schedule_free_step(learning_rate, momentum, warmup_steps, r, weight_lr_power))


def schedule_free_eval_params(opt_state: Any, params):
    """The averaged ``x`` sequence to evaluate: ``(y - (1 - b1) z) / b1``; ``params`` if
    ``opt_state`` holds no schedule-free state."""
    sf = _find(opt_state)
    if sf is None:
        return params
    y, treedef = tree.flatten(params)
    x = foreach.div(foreach.sub(y, foreach.mul(tree.leaves(sf.z), 1 - sf.b1)), sf.b1)
    return tree.unflatten(treedef, x)


def _find(node):
    if isinstance(node, ScheduleFreeState):
        return node
    if isinstance(node, EmptyState):
        return None
    children = node.values() if isinstance(node, dict) else node if isinstance(node, (tuple, list)) else ()
    for child in children:
        found = _find(child)
        if found is not None:
            return found
    return None
