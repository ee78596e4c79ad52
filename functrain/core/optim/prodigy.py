"""Prodigy (Mishchenko & Defazio 2024): Adam whose step size ``d`` is estimated on the fly, as the
``prodigyopt`` package computes it (one parameter group, ``slice_p=1``).

One transformation with the learning rate inside, because the estimate of ``d`` uses it. The
scalars (``d``, ``d_max``, the numerator) live in the state as 0-d float64 tensors; the package's
host-side ``if``s are ``torch.where`` here, so a compiled step never syncs. The state's
``learning_rate`` is the rate before ``d`` (what HF's Trainer logs for it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from functrain.core import tree
from functrain.core.optim.base import GradientTransformation, as_hyperparam, flat_updates, counter_like


class ProdigyState(NamedTuple):
    count: torch.Tensor  # updates done, 0-d int64 (the package's k)
    d: torch.Tensor  # current step-size estimate, 0-d float64
    d_max: torch.Tensor
    d_numerator: torch.Tensor
    learning_rate: torch.Tensor  # the (scheduled) rate of the last update, 0-d fp32
    exp_avg: tree.PyTree
    exp_avg_sq: tree.PyTree
    s: tree.PyTree
    p0: tree.PyTree  # the parameters at init


def prodigy(learning_rate=1.0, b1=0.9, b2=0.999, beta3=None, eps=1e-8, weight_decay=0.0, *, decouple: bool = True,
            use_bias_correction: bool = False, safeguard_warmup: bool = False, d0=1e-6, d_coef=1.0,
            growth_rate=float("inf"), mask=None) -> GradientTransformation:
    """Prodigy matching ``prodigyopt.Prodigy`` (same arguments and defaults; ``mask`` selects the
    parameters that get ``weight_decay``, as HF's parameter groups do)."""
    learning_rate = as_hyperparam(learning_rate, "learning_rate", allow_schedule=True)
    for name, v in (("b1", b1), ("b2", b2)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"prodigy: {name} must be in [0, 1), got {v}")
    if d0 <= 0 or eps <= 0:
        raise ValueError(f"prodigy: d0 and eps must be > 0, got {d0}, {eps}")
    beta3 = math.sqrt(b2) if beta3 is None else beta3

    def current_lr(count):
        lr = learning_rate(count) if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor) else learning_rate
        return torch.as_tensor(lr, dtype=torch.float64, device=count.device)

    def decay_flags(params):
        if not weight_decay:
            return [False] * len(tree.leaves(params))
        if mask is None:
            return [True] * len(tree.leaves(params))
        from functrain.core.optim.combine import _resolve_mask

        return _resolve_mask(mask, params, tree.paths(params))

    def init(params):
        count = counter_like(params)
        f64 = dict(dtype=torch.float64, device=count.device)
        return ProdigyState(count, torch.full((), d0, **f64), torch.full((), d0, **f64), torch.zeros((), **f64),
                            current_lr(count).float(), tree.zeros_like(params) if b1 > 0 else (),
                            tree.zeros_like(params), tree.zeros_like(params), tree.clone(params))

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params, requires_params="prodigy")
        p = tree.leaves(params)
        flags = decay_flags(params)
        if weight_decay and not decouple:
            g = [gi + weight_decay * pi if f else gi for gi, pi, f in zip(g, p, flags)]
        lr = current_lr(state.count)
        d = state.d
        k1 = (state.count + 1).to(torch.float64)
        bias_correction = torch.sqrt(1 - b2 ** k1) / (1 - b1 ** k1) if use_bias_correction else 1.0
        dlr = d * lr * bias_correction
        delta_numerator = sum(torch.dot(gi.flatten(), (p0 - pi).flatten()).double()
                              for gi, p0, pi in zip(g, tree.leaves(state.p0), p)) * (d / d0) * dlr
        exp_avg = [m * b1 + gi * (d * (1 - b1)).float() for m, gi in zip(tree.leaves(state.exp_avg), g)] if b1 > 0 else []
        exp_avg_sq = [v * b2 + gi * gi * (d * d * (1 - b2)).float() for v, gi in zip(tree.leaves(state.exp_avg_sq), g)]
        s_rate = ((d / d0) * d) if safeguard_warmup else ((d / d0) * dlr)
        s = [si * beta3 + gi * s_rate.float() for si, gi in zip(tree.leaves(state.s), g)]
        d_denom = sum(si.abs().sum().double() for si in s)
        numerator = state.d_numerator * beta3 + delta_numerator
        d_hat = d_coef * numerator / d_denom
        new_d = torch.where(d == d0, torch.maximum(d, d_hat), d)
        d_max = torch.maximum(state.d_max, d_hat)
        new_d = torch.minimum(d_max, new_d * growth_rate)
        moved = (d_denom != 0) & (lr > 0)  # the package returns early (no step) when d_denom == 0
        out = []
        for i, (gi, pi) in enumerate(zip(g, p)):
            denom = torch.sqrt(exp_avg_sq[i]) + (new_d * eps).float()
            direction = exp_avg[i] if b1 > 0 else gi * new_d.float()  # (the new d, as the package)
            u = -dlr.float() * direction / denom
            if weight_decay and decouple and flags[i]:
                u = u - (weight_decay * dlr).float() * pi
            out.append(torch.where(moved, u, torch.zeros_like(u)))
        keep = lambda new, old: torch.where(moved, new, old)  # noqa: E731
        new_state = ProdigyState(
            keep(state.count + 1, state.count), keep(new_d, state.d), keep(d_max, state.d_max),
            keep(numerator, state.d_numerator), lr.float(),
            tree.unflatten(treedef, exp_avg) if b1 > 0 else (), tree.unflatten(treedef, exp_avg_sq),
            tree.unflatten(treedef, s), state.p0)
        return tree.unflatten(treedef, out), new_state

    return GradientTransformation(init, update)
