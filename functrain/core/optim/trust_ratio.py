"""Layer-wise trust ratios (LARS, LAMB) and zeroing updates (freezing), optax names."""

from __future__ import annotations

import torch

from functrain.core import foreach, tree
from functrain.core.optim.base import EmptyState, GradientTransformation, as_hyperparam, flat_updates


def scale_by_trust_ratio(min_norm=0.0, trust_coefficient=1.0, eps=0.0) -> GradientTransformation:
    """Scale each leaf's update by ``trust_coefficient * ||param|| / (||update|| + eps)`` (optax).

    ``||param||`` is floored at ``min_norm``; where either norm is zero the ratio is 1.
    """
    min_norm = as_hyperparam(min_norm, "min_norm")
    trust_coefficient = as_hyperparam(trust_coefficient, "trust_coefficient")
    eps = as_hyperparam(eps, "eps")

    def update(updates, state, params=None):
        u, treedef = flat_updates(updates, params, requires_params="scale_by_trust_ratio")
        if not u:
            return updates, state
        p = tree.leaves(params)
        p_norm = foreach.clamp_min(foreach.norm(p), min_norm)
        u_norm = foreach.norm(u)
        out = []
        for ui, pn, un in zip(u, p_norm, u_norm):
            ratio = trust_coefficient * pn / (un + eps)
            ratio = torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio)
            out.append(ui * ratio.to(ui.dtype))
        return tree.unflatten(treedef, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (optax): with ``partition`` it freezes a group of parameters."""

    def update(updates, state, params=None):
        return tree.zeros_like(updates), state

    return GradientTransformation(lambda params: EmptyState(), update)
