"""Elementary gradient transformations (optax names), built on multi-tensor ``_foreach`` ops.

Each ``update`` works on the flat list of leaves: one fused kernel per operation over all tensors,
fast in eager mode and a single loop in a compiled graph. Nothing here mutates an input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import tree
from .base import (
    EmptyState,
    GradientTransformation,
    as_hyperparam,
    check_structure,
    counter_like,
    safe_increment,
)

# -- scaling -------------------------------------------------------------------------------------


def scale(step_size) -> GradientTransformation:
    """Multiply updates by a constant (a number or 0-d tensor)."""
    step_size = as_hyperparam(step_size, "step_size", min_value=None)

    def update(updates, state, params=None):
        return tree.scale(updates, step_size), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ScaleByLearningRateState(NamedTuple):
    count: torch.Tensor  # number of updates done, 0-d int64
    learning_rate: torch.Tensor  # the learning rate used by the last update, 0-d fp32


def scale_by_learning_rate(learning_rate, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (``+`` with ``flip_sign=False``).

    ``learning_rate`` is a number, a 0-d tensor, or a schedule ``step -> lr`` (see
    :mod:`functrain.schedules`) evaluated at the update count, a 0-d tensor, so a compiled step
    follows the schedule without recompiling. The value used is kept in the state for logging.
    """
    learning_rate = as_hyperparam(learning_rate, "learning_rate", allow_schedule=True)
    sign = -1.0 if flip_sign else 1.0

    def current(count):
        lr = learning_rate(count) if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor) else learning_rate
        return torch.as_tensor(lr, dtype=torch.float32, device=count.device)

    def init(params):
        count = counter_like(params)
        return ScaleByLearningRateState(count, current(count))

    def update(updates, state, params=None):
        lr = current(state.count)
        updates = tree.scale(updates, lr * sign)
        return updates, ScaleByLearningRateState(safe_increment(state.count), lr)

    return GradientTransformation(init, update)


scale_by_schedule = scale_by_learning_rate


# -- Adam ----------------------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    mu: tree.PyTree
    nu: tree.PyTree
    nu_max: tree.PyTree  # running max of nu for amsgrad; an empty tuple otherwise


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, *, amsgrad: bool = False) -> GradientTransformation:
    """Adam's preconditioning: ``mu_hat / (sqrt(nu_hat) + eps)`` with bias correction.

    Computed as ``torch.optim.Adam`` does (``eps`` added after dividing ``sqrt(nu)`` by
    ``sqrt(1 - b2**t)``), so results agree with it to float rounding.
    """
    b1 = as_hyperparam(b1, "b1")
    b2 = as_hyperparam(b2, "b2")
    eps = as_hyperparam(eps, "eps")

    def init(params):
        return ScaleByAdamState(
            counter_like(params),
            tree.zeros_like(params),
            tree.zeros_like(params),
            tree.zeros_like(params) if amsgrad else (),
        )

    def update(updates, state, params=None):
        check_structure(updates, params)
        g, treedef = tree.flatten(updates)
        mu = torch._foreach_lerp(tree.leaves(state.mu), g, 1 - b1)
        nu = torch._foreach_mul(tree.leaves(state.nu), b2)
        if isinstance(b2, torch.Tensor):
            torch._foreach_add_(nu, torch._foreach_mul(torch._foreach_mul(g, g), 1 - b2))
        else:
            torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        nu_max = ()
        nu_for_denom = nu
        if amsgrad:
            nu_max = torch._foreach_maximum(tree.leaves(state.nu_max), nu)
            nu_for_denom = nu_max
        count = safe_increment(state.count)
        t = count.to(torch.float64)
        bc1 = (1 - torch.pow(torch.as_tensor(b1, dtype=torch.float64), t)).float()
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.as_tensor(b2, dtype=torch.float64), t)).float()
        denom = torch._foreach_sqrt(nu_for_denom)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu, denom)
        torch._foreach_div_(out, bc1)
        new_state = ScaleByAdamState(
            count,
            tree.unflatten(treedef, mu),
            tree.unflatten(treedef, nu),
            tree.unflatten(treedef, nu_max) if amsgrad else (),
        )
        return tree.unflatten(treedef, out), new_state

    return GradientTransformation(init, update)


# -- weight decay, clipping, momentum ------------------------------------------------------------


def add_decayed_weights(weight_decay=0.0) -> GradientTransformation:
    """``updates + weight_decay * params`` (decoupled weight decay when placed before the lr)."""
    weight_decay = as_hyperparam(weight_decay, "weight_decay")

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        check_structure(updates, params)
        u, treedef = tree.flatten(updates)
        if not u:
            return updates, state
        p = tree.leaves(params)
        if isinstance(weight_decay, torch.Tensor):
            out = torch._foreach_add(u, torch._foreach_mul(p, weight_decay))
        else:
            out = torch._foreach_add(u, p, alpha=weight_decay)
        return tree.unflatten(treedef, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ClipByGlobalNormState(NamedTuple):
    global_norm: torch.Tensor  # the norm of the updates before clipping, at the last update


def clip_by_global_norm(max_norm) -> GradientTransformation:
    """Scale updates so their global l2 norm is at most ``max_norm`` (as ``clip_grad_norm_``).

    The pre-clipping norm is kept in the state (``state.global_norm``) for logging.
    """
    max_norm = as_hyperparam(max_norm, "max_norm")

    def init(params):
        return ClipByGlobalNormState(torch.zeros((), dtype=torch.float32, device=counter_like(params).device))

    def update(updates, state, params=None):
        norm = tree.global_norm(updates)
        # Same formula as torch.nn.utils.clip_grad_norm_: factor = min(1, max_norm / (norm + 1e-6)).
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return tree.scale(updates, factor), ClipByGlobalNormState(norm)

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    count: torch.Tensor
    trace: tree.PyTree


def trace(decay=0.9, *, nesterov: bool = False, dampening=0.0) -> GradientTransformation:
    """Momentum as ``torch.optim.SGD`` computes it.

    ``buf = g`` on the first update, then ``buf = decay * buf + (1 - dampening) * g``; the update
    is ``buf``, or ``g + decay * buf`` with ``nesterov=True``.
    """
    decay = as_hyperparam(decay, "decay")
    dampening = as_hyperparam(dampening, "dampening")
    if nesterov and not isinstance(decay, torch.Tensor) and (decay <= 0 or dampening != 0):
        raise ValueError("nesterov momentum needs decay > 0 and dampening == 0 (as torch.optim.SGD)")

    def init(params):
        return TraceState(counter_like(params), tree.zeros_like(params))

    def update(updates, state, params=None):
        check_structure(updates, params)
        g, treedef = tree.flatten(updates)
        # On the first update buf = g exactly; expressed as coefficients to stay branch-free.
        first = (state.count == 0).to(torch.float32)
        keep = (1 - first) * decay
        take = first + (1 - first) * (1 - dampening)
        buf = torch._foreach_mul(tree.leaves(state.trace), keep)
        torch._foreach_add_(buf, torch._foreach_mul(g, take))
        out = torch._foreach_add(g, torch._foreach_mul(buf, decay)) if nesterov else buf
        return tree.unflatten(treedef, out), TraceState(safe_increment(state.count), tree.unflatten(treedef, buf))

    return GradientTransformation(init, update)
