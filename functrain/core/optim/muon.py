"""Muon (Jordan et al. 2024): momentum orthogonalized by a Newton-Schulz iteration, for 2-D weights.

Computed as ``torch.optim.Muon`` does (torch 2.9+): ``buf = lerp(buf, g, 1 - beta)``, the
Nesterov blend ``lerp(g, buf, beta)``, five quintic Newton-Schulz steps in bfloat16, then the
learning rate scaled by ``sqrt(max(1, rows / cols))`` and decoupled weight decay. optax's
``contrib.muon`` differs in its eps (1e-8), its shape scaling and by running the iteration in the
gradient's dtype. :func:`muon` is the usual recipe: Muon for 2-D parameters, AdamW for the rest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from functrain.core import foreach, tree
from functrain.core.optim.base import GradientTransformation, as_hyperparam, flat_updates, counter_like, safe_increment

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The Newton-Schulz approximation of ``U V^T`` for ``g = U S V^T``, in bfloat16 (as torch)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def shape_scale(shape, adjust_lr_fn: str | None) -> float:
    """torch's ``adjust_lr_fn``: ``"original"`` (default) ``sqrt(max(1, A/B))``, or ``"match_rms_adamw"``."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


class ScaleByMuonState(NamedTuple):
    count: torch.Tensor
    momentum: tree.PyTree


def scale_by_muon(beta=0.95, *, nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS, ns_steps: int = 5,
                  eps: float = 1e-7, adjust_lr_fn: str | None = None) -> GradientTransformation:
    """Muon's direction for 2-D leaves (any other shape is an error: partition them elsewhere)."""
    beta = as_hyperparam(beta, "beta")
    shape_scale((1, 1), adjust_lr_fn)  # validate now

    def init(params):
        bad = [n for n, p in zip(tree.paths(params), tree.leaves(params)) if p.ndim != 2]
        if bad:
            raise ValueError(f"scale_by_muon works on 2-D parameters only; got {bad[:5]}. Use optim.muon(), which "
                             "gives the other parameters AdamW, or partition() them yourself")
        return ScaleByMuonState(counter_like(params), tree.zeros_like(params))

    def update(updates, state, params=None):
        g, treedef = flat_updates(updates, params)
        if not g:
            return updates, state._replace(count=safe_increment(state.count))
        buf = foreach.lerp(tree.leaves(state.momentum), g, 1 - beta)
        blend = foreach.lerp(g, buf, beta) if nesterov else buf
        out = [orthogonalize(x, ns_coefficients, ns_steps, eps).to(x.dtype) * shape_scale(x.shape, adjust_lr_fn)
               for x in blend]
        return tree.unflatten(treedef, out), ScaleByMuonState(safe_increment(state.count), tree.unflatten(treedef, buf))

    return GradientTransformation(init, update)
