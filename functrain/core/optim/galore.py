"""GaLore (Zhao et al. 2024): Adam on gradients projected to a low-rank subspace, as ``galore-torch``'s
``GaLoreAdamW`` computes it, as a pure transformation.

For each targeted 2-D weight the state keeps the projection matrix and Adam moments of the
projected (low-rank) gradient, so optimizer memory is ``rank``-sized. The projection (from an SVD
of the current gradient) is refreshed every ``update_proj_gap`` updates, counted from the first;
the refresh is a ``torch.cond`` on the update count, so a compiled step contains both branches,
runs the SVD only on refresh steps and never recompiles. Everything else gets the same Adam
without projection (galore-torch's AdamW: bias correction folded into the step size, ``eps``
outside the root, weight decay applied after the step to the updated weights).

The Trainer's ``optim="galore_adamw"`` builds what HF builds: :func:`galore_target_names` picks
the ``nn.Linear`` weights named by ``optim_target_modules`` (a list, a regex or a full path, HF's
matching rule), ``optim_args`` give ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from functrain.core import tree
from functrain.core.optim import aliases as A
from functrain.core.optim import transforms as T
from functrain.core.optim.base import GradientTransformation, as_hyperparam, counter_like

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def galore_target_names(model: nn.Module, optim_target_modules) -> set[str]:
    """Names of the ``nn.Linear`` weights HF's Trainer gives GaLore for ``optim_target_modules``.

    A string is a regex that must match the whole module name (``"all-linear"`` takes every
    linear layer); a list matches a module whose name equals an entry, contains one, or fully
    matches one as a regex (``transformers.trainer_utils.check_target_module_exists``).
    """
    if not isinstance(optim_target_modules, (list, tuple, str)):
        raise TypeError(f"optim_target_modules must be a list of strings, a regex string or 'all-linear', "
                        f"got {optim_target_modules!r}")
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"

    def matches(name: str) -> bool:
        if isinstance(optim_target_modules, str):
            return bool(re.fullmatch(optim_target_modules, name))
        return (name in optim_target_modules or any(t in name for t in optim_target_modules)
                or any(re.fullmatch(t, name) for t in optim_target_modules))

    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and (all_linear or matches(n))}
    if not names:
        raise ValueError(f"optim_target_modules={optim_target_modules!r} names no nn.Linear module of "
                         f"{type(model).__name__}; GaLore projects linear weights only")
    return names


def _side(shape, proj_type: str) -> str:
    """Which side gets projected: 'right' (P is (k, n)), 'left' (P is (m, k)) or 'full'."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def _projection_shapes(shape, rank: int, proj_type: str):
    m, n = shape
    k = min(rank, m, n)
    side = _side(shape, proj_type)
    if side == "right":
        return side, [(k, n)], (m, k)
    if side == "left":
        return side, [(m, k)], (k, n)
    return side, [(m, k), (k, n)], (k, k)


def _orthogonal(g: torch.Tensor, k: int, side: str) -> list[torch.Tensor]:
    """galore-torch's ``get_orthogonal_matrix``: SVD in fp32, the ``k`` leading singular vectors."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    left, right = u[:, :k].to(g.dtype).contiguous(), vh[:k, :].to(g.dtype).contiguous()  # (cond: one layout)
    return [right] if side == "right" else [left] if side == "left" else [left, right]


def _project(g, mats, side):
    if side == "right":
        return g @ mats[0].T
    if side == "left":
        return mats[0].T @ g
    return mats[0].T @ g @ mats[1].T


def _project_back(low, mats, side, proj_type):
    if proj_type == "std":  # galore-torch decides from the low-rank shape here
        return low @ mats[0] if low.shape[0] >= low.shape[1] else mats[0] @ low
    if proj_type == "reverse_std":
        return mats[0] @ low if low.shape[0] <= low.shape[1] else low @ mats[0]
    if side == "right":
        return low @ mats[0]
    if side == "left":
        return mats[0] @ low
    return mats[0] @ low @ mats[1]


def _validated_pick(targets, rank, update_proj_gap, proj_type):
    """Check the projection settings; ``(name, param) -> bool`` for ``targets``."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"galore: proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    for name, v in (("rank", rank), ("update_proj_gap", update_proj_gap)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"galore: {name} must be an int >= 1, got {v!r}")
    return targets if callable(targets) else (lambda name, p, _t=frozenset(targets): name in _t)


def _plan(params, pick, rank: int, proj_type: str) -> dict:
    """``{name: (side, projection shapes, low-rank shape)}`` for the targeted leaves."""
    out = {}
    for name, p in tree.named_leaves(params).items():
        if pick(name, p):
            if p.ndim != 2:
                raise ValueError(f"galore: target {name!r} has shape {tuple(p.shape)}; only 2-D weights project")
            out[name] = _projection_shapes(tuple(p.shape), rank, proj_type)
    return out


def _init_projections(named: dict, plan: dict, targets) -> dict:
    if targets and not plan:
        raise ValueError("galore: no parameter matches targets")
    return {n: [named[n].new_zeros(s) for s in shapes] for n, (_, shapes, _) in plan.items()}


def _projected(g, old: list, refresh, side: str, shapes) -> tuple[torch.Tensor, list]:
    """``g`` projected, and the projection: from an SVD of ``g`` when ``refresh`` (a 0-d bool), else
    ``old``. A ``torch.cond``, so a compiled update holds both branches and never recompiles."""
    k = shapes[0][0] if side == "right" else shapes[0][1]
    mats = torch.cond(refresh, lambda g_, *old_: tuple(_orthogonal(g_, k, side)),
                      lambda g_, *old_: tuple(o.clone().contiguous() for o in old_), (g, *old))
    return _project(g, mats, side), list(mats)


def _current_lr(learning_rate, count):
    lr = learning_rate(count) if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor) else learning_rate
    return torch.as_tensor(lr, dtype=torch.float32, device=count.device)


class GaLoreAdamState(NamedTuple):
    count: torch.Tensor  # updates done, 0-d int64
    projections: dict  # {name: [matrix, ...]} for the projected leaves
    exp_avg: dict  # {name: moment}, low-rank shaped for projected leaves
    exp_avg_sq: dict
    learning_rate: torch.Tensor  # the rate of the last update, 0-d fp32 (logged)


def galore_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, *, targets=(), rank: int = 128,
                 update_proj_gap: int = 200, scale=0.25, proj_type: str = "std",
                 correct_bias: bool = True) -> GradientTransformation:
    """``galore_torch.GaLoreAdamW`` with the parameters named in ``targets`` (2-D) projected.

    ``targets``: a collection of dotted parameter names (e.g. from :func:`galore_target_names`)
    or a function ``(name, param) -> bool``. Defaults are galore-torch's (``eps=1e-6``).
    """
    learning_rate = as_hyperparam(learning_rate, "learning_rate", allow_schedule=True)
    pick = _validated_pick(targets, rank, update_proj_gap, proj_type)

    def init(params):
        count = counter_like(params)
        named = tree.named_leaves(params)
        plan = _plan(params, pick, rank, proj_type)
        projections = _init_projections(named, plan, targets)
        moment = {n: (named[n].new_zeros(plan[n][2]) if n in plan else torch.zeros_like(p)) for n, p in named.items()}
        return GaLoreAdamState(count, projections, moment, {n: torch.zeros_like(m) for n, m in moment.items()},
                               _current_lr(learning_rate, count))

    def update(updates, state, params=None):
        if params is None and weight_decay:
            raise ValueError("galore_adamw needs params for weight decay: call update(grads, state, params)")
        named_g, treedef = tree.named_leaves(updates), tree.structure(updates)
        named_p = tree.named_leaves(params) if params is not None else {}
        plan = _plan(updates if params is None else params, pick, rank, proj_type)
        refresh = (state.count % update_proj_gap) == 0
        t = (state.count + 1).to(torch.float64)
        lr = _current_lr(learning_rate, state.count)
        step_size = lr.double()
        if correct_bias:
            step_size = step_size * torch.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        out, projections, exp_avg, exp_avg_sq = [], {}, {}, {}
        for name, g in named_g.items():
            if name in plan:
                g, projections[name] = _projected(g, state.projections[name], refresh, *plan[name][:2])
            m = state.exp_avg[name] * b1 + g * (1 - b1)
            v = state.exp_avg_sq[name] * b2 + g * g * (1 - b2)
            exp_avg[name], exp_avg_sq[name] = m, v
            norm_grad = m / (torch.sqrt(v) + eps)
            if name in plan:
                norm_grad = _project_back(norm_grad, projections[name], plan[name][0], proj_type) * scale
            u = -step_size.float() * norm_grad
            if weight_decay:  # galore-torch decays the already-updated weights: p1 * (1 - lr * wd)
                u = u - (lr * weight_decay) * (named_p[name] + u)
            out.append(u)
        return tree.unflatten(treedef, out), GaLoreAdamState(state.count + 1, projections, exp_avg, exp_avg_sq, lr)

    return GradientTransformation(init, update)


class GaLoreAdafactorState(NamedTuple):
    count: torch.Tensor  # updates done, 0-d int64
    projections: dict  # {name: [matrix, ...]} for the projected leaves
    adafactor: tuple  # Adafactor's state over the low-rank shaped gradients (targets) and the others
    learning_rate: torch.Tensor  # Adafactor's step size of the last update, 0-d fp32 (logged)


def galore_adafactor(learning_rate=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                     weight_decay=0.0, scale_parameter: bool = True, relative_step: bool = True,
                     warmup_init: bool = False, *, targets=(), rank: int = 128, update_proj_gap: int = 200,
                     scale=0.25, proj_type: str = "std") -> GradientTransformation:
    """``galore_torch.GaLoreAdafactor`` with the parameters named in ``targets`` (2-D) projected.

    Adafactor (:func:`functrain.optim.adafactor`, transformers' arguments and defaults) runs on the
    projected gradients of the targets, so their factored second moments and first moment are
    low-rank shaped; its update is projected back and multiplied by ``scale``. As galore-torch:
    the parameter scale (``scale_parameter``) is the full weight's RMS, and weight decay
    ``weight_decay * lr * param`` is on the full weight (before the update), ``lr`` being
    Adafactor's per-leaf rate. The projection refreshes as in :func:`galore_adamw`.
    """
    pick = _validated_pick(targets, rank, update_proj_gap, proj_type)
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise ValueError(f"galore_adafactor: eps must be a pair (eps_square, eps_scale), got {eps!r}")
    weight_decay = as_hyperparam(weight_decay, "weight_decay")
    # Decay comes after projecting back (it is on the full weight), so Adafactor itself gets none.
    inner = A.adafactor(learning_rate, eps, clip_threshold, decay_rate, beta1, 0.0, scale_parameter, relative_step,
                      warmup_init)
    decays = isinstance(weight_decay, torch.Tensor) or weight_decay != 0

    def low_rank_like(tree_, plan):
        named, treedef = tree.named_leaves(tree_), tree.structure(tree_)
        return tree.unflatten(treedef, [x.new_zeros(plan[n][2]) if n in plan else x for n, x in named.items()])

    def init(params):
        count = counter_like(params)
        plan = _plan(params, pick, rank, proj_type)
        projections = _init_projections(tree.named_leaves(params), plan, targets)
        inner_state = inner.init(low_rank_like(params, plan))
        return GaLoreAdafactorState(count, projections, inner_state, inner_state[1].learning_rate)

    def update(updates, state, params=None):
        if params is None and (scale_parameter or decays):
            raise ValueError("galore_adafactor needs params (parameter scaling / weight decay): "
                             "call update(grads, state, params)")
        named_g, treedef = tree.named_leaves(updates), tree.structure(updates)
        plan = _plan(updates if params is None else params, pick, rank, proj_type)
        refresh = (state.count % update_proj_gap) == 0
        low, projections = [], {}
        for name, g in named_g.items():
            if name in plan:
                g, projections[name] = _projected(g, state.projections[name], refresh, *plan[name][:2])
            low.append(g)
        low_u, inner_state = inner.update(tree.unflatten(treedef, low), state.adafactor, params)
        step_size = inner_state[1].learning_rate
        named_p = tree.named_leaves(params) if params is not None else {}
        out = []
        for name, u in tree.named_leaves(low_u).items():
            if name in plan:
                u = _project_back(u, projections[name], plan[name][0], proj_type) * scale
            if decays:  # galore-torch: p -= weight_decay * lr * p, lr = step size (x max(eps, rms(p)))
                p = named_p[name]
                lr = step_size * torch.clamp(T.rms(p), min=eps[1]) if scale_parameter else step_size
                u = u - (weight_decay * lr) * p
            out.append(u)
        return (tree.unflatten(treedef, out),
                GaLoreAdafactorState(state.count + 1, projections, inner_state, step_size))

    return GradientTransformation(init, update)
