"""The optimizer update of a donated eager step, a group of parameters at a time.

Out of place, ``tx.update`` over the whole tree holds a new copy of every moment, the updates and
the new params at once: with AdamW that is ~4 extra copies of the params on top of the state.
Inside ``torch.compile`` the donation copy fuses with the computation, so none of that is alive;
in eager mode it is. When the transformation is *leafwise* (each parameter's update reads only
its own gradient, state and value, plus shared scalars such as the step count: Adam(W), SGD,
Lion, RMSprop, Adagrad), running ``tx.update`` on a few parameters at a time gives the same
numbers, and each group's results can be written into the donated storages at once, so only
one group's temporaries are alive. Shared scalars (counts, hyperparameters) are written after
the last group, so every group reads the values the whole-tree update would read.
"""

from __future__ import annotations

import torch

from functrain.core import tree
from functrain.core.optim.base import apply_updates, update_with_extra_args
from functrain.core.optim.transforms import clip_factor

# A group holds about this fraction of all parameter elements (but at least one tensor).
GROUPS = 8


def parameter_groups(params: dict, groups: int | None = None) -> list[list[str]]:
    """Consecutive names of ``params`` in groups of about ``1 / groups`` of all elements
    (default :data:`GROUPS`, read at the call so it can be changed for a run or a test)."""
    budget = max(1, sum(p.numel() for p in params.values()) // (GROUPS if groups is None else groups))
    out, current, size = [], [], 0
    for name, p in params.items():
        if current and size + p.numel() > budget:
            out.append(current)
            current, size = [], 0
        current.append(name)
        size += p.numel()
    if current:
        out.append(current)
    return out


def _slice_state(node, names: frozenset, group: set, per_param: set):
    """``node`` with every dict keyed by parameter names cut down to ``group``'s entries.

    The ids of the tensors kept from such dicts (per-parameter state) go to ``per_param``.
    """
    if isinstance(node, dict) and node and set(node) <= names:
        kept = {k: v for k, v in node.items() if k in group}
        per_param.update(id(t) for t in tree.leaves(kept))
        return kept
    if isinstance(node, dict):
        return type(node)((k, _slice_state(v, names, group, per_param)) for k, v in node.items())
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_slice_state(v, names, group, per_param) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_slice_state(v, names, group, per_param) for v in node)
    return node


def apply_update_in_groups_(tx, params: dict, opt_state, grads: dict, *, max_grad_norm: float | None = None,
                            value=None, finite=None, groups: int | None = None,
                            grad_norm: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`functrain.step.update.apply_update` for a leafwise ``tx``, IN PLACE: ``params`` and
    ``opt_state`` receive the new values, group by group; returns the gradients' global norm.

    ``grads`` is consumed (its entries are dropped as their group is done). ``finite``: a 0-d bool;
    where False every value keeps its old one (``skip_non_finite``), chosen on the device.
    ``grad_norm``: the gradients' global norm when the caller has it already.
    """

    def keep(new, old):
        return new if finite is None else torch.where(finite, new, old)

    grad_norm = tree.global_norm(grads) if grad_norm is None else grad_norm
    clip = clip_factor(grad_norm, max_grad_norm) if max_grad_norm is not None else None
    extra = {} if value is None else {"value": value}
    names = frozenset(params)
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in parameter_groups(params, groups):
        sub_grads = {n: grads.pop(n) for n in group}
        if clip is not None:
            sub_grads = tree.scale(sub_grads, clip)
        sub_params = {n: params[n] for n in group}
        per_param: set[int] = set()
        sub_state = _slice_state(opt_state, names, set(group), per_param)
        updates, new_state = update_with_extra_args(tx, sub_grads, sub_state, sub_params, **extra)
        del sub_grads
        new_params = apply_updates(sub_params, updates)
        del updates
        tree.copy_(sub_params, new_params if finite is None else tree.where(finite, new_params, sub_params))
        olds, news = tree.leaves(sub_state), tree.leaves(new_state)
        if len(olds) != len(news):
            raise ValueError(f"the optimizer's update changed its state's structure ({len(olds)} -> {len(news)} "
                             "leaves): it cannot run with leafwise_update=True; pass leafwise_update=False")
        for old, new in zip(olds, news):
            if not isinstance(old, torch.Tensor):
                continue
            if id(old) in per_param:
                tree.copy_(old, keep(new, old))  # (a DTensor shard: its local tensor)
            else:  # a shared scalar: every group must read its old value
                shared[id(old)] = (old, new)
    for old, new in shared.values():
        tree.copy_(old, keep(new, old))
    return grad_norm
