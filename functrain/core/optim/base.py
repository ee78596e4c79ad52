"""Gradient transformations: the optax model, in PyTorch.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = apply_updates(params, updates)

``update`` never mutates its inputs: every result is a fresh tensor. (A step with ``donate=True``
copies results back into the input storages; inside ``torch.compile`` that copy is fused into the
computation, so it costs no extra memory.) States are NamedTuples of tensors, so they are pytrees
that save, load and vmap like any other.

Hyperparameters (learning rate, betas, weight decay, ...) may be Python numbers or 0-d tensors;
tensors let a compiled step change them without recompiling (see ``inject_hyperparams``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from .. import foreach, tree

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]


class GradientTransformationExtraArgs(GradientTransformation):
    """A transformation whose ``update(updates, state, params=None, **extra_args)`` takes extra
    keyword arguments (optax's class of the same name).

    The train step passes ``value=loss`` (the window's mean loss, a 0-d tensor), so a transform can
    use the objective (``reduce_on_plateau``, Polyak step sizes, line searches). Combinators
    (``chain``, ``masked``, ``partition``, ...) forward the extra arguments to the transforms that
    take them; plain :class:`GradientTransformation` updates never see them.
    """


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformationExtraArgs:
    """``tx`` as a :class:`GradientTransformationExtraArgs` (extra arguments dropped if it takes none)."""
    if isinstance(tx, GradientTransformationExtraArgs):
        return tx

    def update(updates, state, params=None, **extra_args):
        del extra_args
        return tx.update(updates, state, params)

    return GradientTransformationExtraArgs(tx.init, update)


def update_with_extra_args(tx: GradientTransformation, updates, state, params=None, **extra_args):
    """``tx.update`` with ``extra_args`` passed only where ``tx`` takes them."""
    if isinstance(tx, GradientTransformationExtraArgs):
        return tx.update(updates, state, params, **extra_args)
    return tx.update(updates, state, params)


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """Leaves updates unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def stateless(fn: Callable[[Updates, Params], Updates]) -> GradientTransformation:
    """A transformation from a pure function ``fn(updates, params) -> updates``."""

    def update(updates, state, params=None):
        return fn(updates, params), state

    return GradientTransformation(lambda params: EmptyState(), update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in sequence; the state is the tuple of their states."""
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain argument {i} is not a GradientTransformation: {t!r}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra_args):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of length {len(state)}")
        new_states = []
        for t, s in zip(transforms, state):
            updates, s = update_with_extra_args(t, updates, s, params, **extra_args)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransformationExtraArgs(init, update)


def named_chain(*named_transforms: tuple[str, GradientTransformation]) -> GradientTransformationExtraArgs:
    """``chain`` whose state is a dict ``{name: state}`` (optax ``named_chain``), for readable states."""
    names = [n for n, _ in named_transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}")
    inner = chain(*(t for _, t in named_transforms))

    def init(params):
        return dict(zip(names, inner.init(params)))

    def update(updates, state, params=None, **extra_args):
        if set(state) != set(names):
            raise ValueError(f"named_chain of {names} got a state with keys {list(state)}")
        updates, states = inner.update(updates, tuple(state[n] for n in names), params, **extra_args)
        return updates, dict(zip(names, states))

    return GradientTransformationExtraArgs(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf-wise, out of place, keeping each param's dtype."""
    tree.assert_same_structure(params, updates, "params", "updates")
    lp, treedef = tree.flatten(params)
    lu = tree.leaves(updates)
    lu = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(lp, lu)]
    return tree.unflatten(treedef, foreach.add(lp, lu)) if lp else params


# -- helpers shared by the transforms ----------------------------------------------------------


def require_params(params: Params | None, transform: str) -> None:
    """A clear error for a transform that needs ``params`` and was called without them."""
    if params is None:
        raise ValueError(f"{transform} needs params: call update(grads, state, params)")


def flat_updates(updates: Updates, params: Params | None = None, *, requires_params: str | None = None):
    """``(leaves, treedef)`` of ``updates``, checked against ``params`` first.

    ``requires_params``: the transform's name, for transforms that cannot run without params.
    """
    if requires_params:
        require_params(params, requires_params)
    check_structure(updates, params)
    return tree.flatten(updates)


def check_structure(updates: Updates, params: Params | None) -> None:
    """Raise a clear error if ``params`` is given and its structure differs from ``updates``."""
    if params is not None:
        tree.assert_same_structure(updates, params, "updates (gradients)", "params")


def as_hyperparam(value, name: str, *, min_value: float | None = 0.0, allow_schedule=False):
    """Validate a hyperparameter: a number or a 0-d tensor, optionally a schedule callable."""
    if callable(value) and not isinstance(value, torch.Tensor):
        if not allow_schedule:
            raise TypeError(f"{name} must be a number or a 0-d tensor, got a callable")
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a 0-d tensor{' or a schedule' if allow_schedule else ''}, "
                        f"got {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return float(value)


def counter_like(params: Params) -> torch.Tensor:
    """A 0-d int64 step counter on the device of the first parameter."""
    ls = tree.leaves(params)
    device = ls[0].device if ls else None
    return torch.zeros((), dtype=torch.int64, device=device)


def safe_increment(count: torch.Tensor) -> torch.Tensor:
    """``count + 1`` that saturates instead of wrapping around."""
    return torch.where(count < torch.iinfo(torch.int64).max, count + 1, count)
