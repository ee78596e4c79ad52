"""Adam's relatives (optax names): Adamax, RAdam, NAdam and Adadelta preconditioning.

Each computes what the ``torch.optim`` class of the same name computes (so results agree to
float rounding); where optax's definition differs, the docstring says how. The learning rate and
weight decay come from other transforms in the chain (see :mod:`functrain.core.optim.aliases`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from functrain.core import foreach, tree
from functrain.core.optim.base import (
    GradientTransformation,
    as_hyperparam,
    flat_updates,
    counter_like,
    safe_increment,
)


def _moments_init(state_type):
    """``init`` of a ``(count, mu, nu)`` state: a zero count and zero first and second moments."""
    return lambda params: state_type(counter_like(params), tree.zeros_like(params), tree.zeros_like(params))


class ScaleByAdamaxState(NamedTuple):
    count: torch.Tensor
    mu: tree.PyTree
    nu: tree.PyTree  # exponentially weighted infinity norm


def scale_by_adamax(b1=0.9, b2=0.999, eps=1e-8) -> GradientTransformation:
    """Adamax: ``mu_hat / nu`` with ``nu = max(b2 * nu, |g| + eps)`` (optax and torch agree)."""
    b1, b2, eps = as_hyperparam(b1, "b1"), as_hyperparam(b2, "b2"), as_hyperparam(eps, "eps")

    init = _moments_init(ScaleByAdamaxState)

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params)
        count = safe_increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        mu = foreach.lerp(tree.leaves(state.mu), g, 1 - b1)
        nu = foreach.maximum(foreach.mul(tree.leaves(state.nu), b2),
                                    foreach.add(foreach.abs(g), eps))
        bc1 = 1 - torch.pow(torch.as_tensor(b1, dtype=torch.float64), count.to(torch.float64)).float()
        out = foreach.div(mu, nu)
        foreach.div_(out, bc1)
        return tree.unflatten(treedef, out), ScaleByAdamaxState(count, tree.unflatten(treedef, mu),
                                                                 tree.unflatten(treedef, nu))

    return GradientTransformation(init, update)


class ScaleByRAdamState(NamedTuple):
    count: torch.Tensor
    mu: tree.PyTree
    nu: tree.PyTree


def scale_by_radam(b1=0.9, b2=0.999, eps=1e-8, threshold=5.0) -> GradientTransformation:
    """Rectified Adam (Liu et al. 2020) as ``torch.optim.RAdam`` computes it.

    While the SMA length ``rho_t <= threshold`` the update is the bias-corrected momentum alone;
    after, ``r_t * mu_hat * sqrt(1 - b2**t) / (sqrt(nu) + eps)``. optax's ``scale_by_radam``
    differs in two details: it switches at ``rho_t >= threshold`` and divides by
    ``sqrt(nu_hat) + eps`` (``eps`` not scaled by the bias correction).
    """
    b1, b2, eps = as_hyperparam(b1, "b1"), as_hyperparam(b2, "b2"), as_hyperparam(eps, "eps")
    if not isinstance(b2, float):
        raise TypeError("scale_by_radam: b2 must be a number (it fixes the SMA length rho_inf)")
    rho_inf = 2 / (1 - b2) - 1

    init = _moments_init(ScaleByRAdamState)

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params)
        count = safe_increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        mu = foreach.lerp(tree.leaves(state.mu), g, 1 - b1)
        nu = foreach.mul(tree.leaves(state.nu), b2)
        foreach.addcmul_(nu, g, g, value=1 - b2)
        t = count.to(torch.float64)
        b2t = torch.pow(torch.as_tensor(b2, dtype=torch.float64), t)
        bc1 = 1 - torch.pow(torch.as_tensor(b1, dtype=torch.float64), t)
        rho_t = rho_inf - 2 * t * b2t / (1 - b2t)
        rect = torch.sqrt(((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp_min(0))
        rectified = rho_t > threshold
        # adaptive factor where rectified, 1/sqrt(...) never evaluated on the host: branch-free.
        coef = torch.where(rectified, rect * torch.sqrt(1 - b2t), torch.zeros_like(rect)).float()
        mu_hat = foreach.div(mu, bc1.float())
        denom = foreach.add(foreach.sqrt(nu), eps)
        adaptive = foreach.mul(foreach.div(mu_hat, denom), coef)
        plain = foreach.mul(mu_hat, (~rectified).float())
        out = foreach.add(adaptive, plain)
        return tree.unflatten(treedef, out), ScaleByRAdamState(count, tree.unflatten(treedef, mu),
                                                                tree.unflatten(treedef, nu))

    return GradientTransformation(init, update)


class ScaleByNAdamState(NamedTuple):
    count: torch.Tensor
    mu_product: torch.Tensor  # product of the momentum coefficients so far, 0-d fp32
    mu: tree.PyTree
    nu: tree.PyTree


def scale_by_nadam(b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3) -> GradientTransformation:
    """NAdam (Dozat 2016) with its momentum schedule, as ``torch.optim.NAdam`` computes it.

    ``mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``; the update is
    ``((1 - mu_t) / (1 - prod mu) * g + mu_{t+1} / (1 - prod mu * mu_{t+1}) * m) / (sqrt(nu_hat) + eps)``.
    optax's ``nadam`` (``scale_by_adam(nesterov=True)``) has no momentum schedule (constant
    ``b1``); the two give different numbers.
    """
    b1, b2, eps = as_hyperparam(b1, "b1"), as_hyperparam(b2, "b2"), as_hyperparam(eps, "eps")
    momentum_decay = as_hyperparam(momentum_decay, "momentum_decay")

    def init(params):
        count = counter_like(params)
        return ScaleByNAdamState(count, torch.ones((), dtype=torch.float32, device=count.device),
                                 tree.zeros_like(params), tree.zeros_like(params))

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params)
        count = safe_increment(state.count)
        t = count.to(torch.float64)
        mu_t = b1 * (1.0 - 0.5 * torch.pow(torch.as_tensor(0.96, dtype=torch.float64), t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * torch.pow(torch.as_tensor(0.96, dtype=torch.float64), (t + 1) * momentum_decay))
        mu_product = state.mu_product * mu_t.float()
        if not g:
            return updates, state._replace(count=count, mu_product=mu_product)
        m = foreach.lerp(tree.leaves(state.mu), g, 1 - b1)
        nu = foreach.mul(tree.leaves(state.nu), b2)
        foreach.addcmul_(nu, g, g, value=1 - b2)
        bc2 = (1 - torch.pow(torch.as_tensor(b2, dtype=torch.float64), t)).float()
        denom = foreach.sqrt(foreach.div(nu, bc2))
        foreach.add_(denom, eps)
        mu_product_next = mu_product.double() * mu_next
        c_grad = ((1.0 - mu_t) / (1.0 - mu_product.double())).float()
        c_mom = (mu_next / (1.0 - mu_product_next)).float()
        out = foreach.add(foreach.mul(foreach.div(g, denom), c_grad),
                                 foreach.mul(foreach.div(m, denom), c_mom))
        return tree.unflatten(treedef, out), ScaleByNAdamState(count, mu_product, tree.unflatten(treedef, m),
                                                                tree.unflatten(treedef, nu))

    return GradientTransformation(init, update)


class ScaleByAdaDeltaState(NamedTuple):
    e_g: tree.PyTree  # running average of squared gradients
    e_x: tree.PyTree  # running average of squared updates


def scale_by_adadelta(rho=0.9, eps=1e-6) -> GradientTransformation:
    """Adadelta (Zeiler 2012): ``sqrt(e_x + eps) / sqrt(e_g + eps) * g`` (optax and torch agree)."""
    rho, eps = as_hyperparam(rho, "rho"), as_hyperparam(eps, "eps")

    def init(params):
        return ScaleByAdaDeltaState(tree.zeros_like(params), tree.zeros_like(params))

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params)
        if not g:
            return updates, state
        e_g = foreach.mul(tree.leaves(state.e_g), rho)
        foreach.addcmul_(e_g, g, g, value=1 - rho)
        std = foreach.sqrt(foreach.add(e_g, eps))
        delta = foreach.sqrt(foreach.add(tree.leaves(state.e_x), eps))
        delta = foreach.mul(foreach.div(delta, std), g)
        e_x = foreach.mul(tree.leaves(state.e_x), rho)
        foreach.addcmul_(e_x, delta, delta, value=1 - rho)
        return tree.unflatten(treedef, delta), ScaleByAdaDeltaState(tree.unflatten(treedef, e_g),
                                                                     tree.unflatten(treedef, e_x))

    return GradientTransformation(init, update)

