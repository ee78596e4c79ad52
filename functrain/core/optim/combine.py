"""Wrappers that combine or steer transformations (optax's ``combine`` / ``wrappers``).

* :func:`masked` applies a transformation to some parameters only;
* :func:`partition` gives each group of parameters its own transformation;
* :func:`inject_hyperparams` keeps hyperparameters in the state as 0-d tensors, so a compiled step
  can change them (or follow a schedule) without recompiling;
* :func:`apply_if_finite` skips updates that contain ``inf``/``nan``, branch-free.

Selections (masks, labels) are resolved from parameter *names* and Python values when the step is
traced, never from tensor values: they cost nothing at run time and never sync the host.
An inner transformation always sees the selected leaves as a flat ``{dotted_path: leaf}`` dict.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import torch

from .. import tree
from .base import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    flat_updates,
    safe_increment,
    update_with_extra_args,
)

# -- selecting leaves ----------------------------------------------------------------------------


def _names_and_leaves(updates, params):
    """Dotted names and leaves of ``updates``; names come from ``params`` when given."""
    leaves, treedef = flat_updates(updates, params)
    return tree.paths(updates), leaves, treedef


def _check_shaped_like_params(t, names: list[str], what: str) -> None:
    """Raise if pytree ``t`` does not have one leaf per parameter, at the same dotted paths.

    (Compares paths rather than optree treedefs: dynamo cannot build the treedef of a dict of
    Python bools or strings, and paths say more in the error message anyway.)
    """
    got = tree.paths(t)
    if got != names:
        missing = sorted(set(names) - set(got))[:5]
        extra = sorted(set(got) - set(names))[:5]
        raise ValueError(
            f"{what} must be shaped like the params (one entry per parameter); "
            f"missing entries for {missing}, entries for unknown parameters {extra}"
        )


def _leaves_shaped_like_params(t, params, names: list[str], what: str) -> list:
    """The leaves of ``t`` (a mask or label pytree), after checking it is shaped like ``params``.

    Eager calls get the readable check; in a compiled trace (where dynamo cannot flatten a tree of
    Python bools/strings on its own) the leaves are taken by mapping over ``params``, which still
    fails on a structure mismatch.
    """
    if not torch.compiler.is_compiling():
        _check_shaped_like_params(t, names, what)
    return tree.leaves(tree.map(lambda _, x: x, params, t))


def mask_flags(mask, params) -> list[bool]:
    """``mask`` (a pytree of Python bools shaped like ``params``, or a function ``params -> mask``)
    as one bool per leaf of ``params``, in leaf order."""
    return _resolve_mask(mask, params, tree.paths(params), require_any=False)


def _select(names: list[str], leaves: list, chosen: list[bool]) -> dict:
    return {n: x for n, x, c in zip(names, leaves, chosen) if c}


def _merge(leaves: list, names: list[str], chosen: list[bool], selected: dict) -> list:
    """``leaves`` with the chosen positions replaced by ``selected[name]``."""
    return [selected[n] if c else x for n, x, c in zip(names, leaves, chosen)]


# -- recording selections (for flat layouts) ---------------------------------------------------

_log = threading.local()


@contextlib.contextmanager
def recording_selections():
    """Collect, in this thread, what each ``masked``/``partition`` ``init`` selects: a list of
    ``{name: flag or label}``, one per selection, in call order. :mod:`functrain.core.flat` groups
    parameters that every selection treats alike into one flat segment."""
    before = getattr(_log, "entries", None)
    _log.entries = []
    try:
        yield _log.entries
    finally:
        _log.entries = before


def _record(names: list[str], values: list) -> None:
    entries = getattr(_log, "entries", None)
    if entries is not None:
        entries.append(dict(zip(names, values)))


# -- masked --------------------------------------------------------------------------------------


class MaskedState(NamedTuple):
    inner_state: Any  # the inner transformation's state over the selected leaves only


def _resolve_mask(mask, tree_for_mask, names: list[str], require_any: bool = True) -> list[bool]:
    """The mask as one Python bool per leaf, checked against the params' structure.

    ``require_any``: at ``init`` (the whole tree) a mask selecting nothing is a mistake; an update
    of a group of the params (a grouped donated step) may select nothing."""
    m = mask(tree_for_mask) if callable(mask) else mask
    flags = _leaves_shaped_like_params(m, tree_for_mask, names, "masked: mask")
    for name, f in zip(names, flags):
        if not isinstance(f, bool):
            raise TypeError(
                f"masked: mask entries must be Python bools (resolved before tracing), got "
                f"{type(f).__name__} for parameter {name!r}"
            )
    if require_any and names and not any(flags):
        raise ValueError(
            f"masked: the mask selects no parameter at all (all {len(names)} entries are False); "
            "the inner transformation would never apply. Check the mask (e.g. parameter names) "
            "or drop the masked() wrapper."
        )
    return flags


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """Apply ``inner`` to the parameters where ``mask`` is True; pass the others through untouched.

    ``mask`` is a pytree of Python bools shaped like the params, or a function ``params -> mask``
    (e.g. :func:`functrain.optim.default_weight_decay_mask`). ``inner`` sees only the selected
    leaves, as a ``{dotted_path: leaf}`` dict, so its state holds nothing for the others.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: inner must be a GradientTransformation, got {inner!r}")

    def init(params):
        names, leaves, _ = _names_and_leaves(params, None)
        flags = _resolve_mask(mask, params, names)
        _record(names, flags)
        return MaskedState(inner.init(_select(names, leaves, flags)))

    def update(updates, state, params=None, **extra_args):
        names, leaves, treedef = _names_and_leaves(updates, params)
        flags = _resolve_mask(mask, params if params is not None else updates, names, require_any=False)
        sel_params = None if params is None else _select(names, tree.leaves(params), flags)
        new_sel, inner_state = update_with_extra_args(inner, _select(names, leaves, flags), state.inner_state,
                                                      sel_params, **extra_args)
        return tree.unflatten(treedef, _merge(leaves, names, flags, new_sel)), MaskedState(inner_state)

    return GradientTransformationExtraArgs(init, update)


# -- partition -----------------------------------------------------------------------------------


class PartitionState(NamedTuple):
    inner_states: dict  # {label: state of transforms[label] over the leaves with that label}


def _labels_from_regex(patterns: Mapping[str, Hashable], names: list[str]) -> list:
    compiled = [(re.compile(p), label) for p, label in patterns.items()]
    labels, unlabeled = [], []
    for n in names:
        label = next((lab for rx, lab in compiled if rx.search(n)), None)
        if label is None:
            unlabeled.append(n)
        labels.append(label)
    if unlabeled:
        raise ValueError(
            f"partition: {len(unlabeled)} parameter(s) match no pattern in labels "
            f"{list(patterns)}: {unlabeled[:10]}. Add a catch-all pattern such as '.*'."
        )
    return labels


def _resolve_labels(labels, params, names: list[str], leaves: list) -> list:
    """One label per leaf, from a label pytree, a ``(name, param) -> label`` function or regexes."""
    if callable(labels):
        out = [labels(n, x) for n, x in zip(names, leaves)]
    elif isinstance(labels, Mapping) and not (isinstance(params, Mapping) and set(labels) == set(params)):
        out = _labels_from_regex(labels, names)  # a dict not keyed like the params: regexes
    else:
        out = _leaves_shaped_like_params(labels, params, names, "partition: labels")
    unlabeled = [n for n, lab in zip(names, out) if lab is None]
    if unlabeled:
        raise ValueError(f"partition: parameter(s) without a label: {unlabeled[:10]}")
    return out


def partition(transforms: Mapping[Hashable, GradientTransformation], labels) -> GradientTransformation:
    """Give each group of parameters its own transformation (optax ``multi_transform``).

    ``labels`` assigns a label (a key of ``transforms``) to every parameter, as one of:

    * a pytree of labels shaped like the params;
    * a function ``(name, param) -> label``;
    * a dict ``{regex: label}`` searched in order on the dotted parameter names (first match wins).

    Every parameter needs a label and every label used needs a transform; otherwise a
    ``ValueError`` lists the offenders. Each transform sees its group as ``{dotted_path: leaf}``.
    """
    transforms = dict(transforms)
    for k, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"partition: transforms[{k!r}] is not a GradientTransformation: {t!r}")

    def groups(names, leaves, reference):
        labs = _resolve_labels(labels, reference, names, leaves)
        missing = sorted({str(lab) for lab in labs if lab not in transforms})
        if missing:
            raise ValueError(
                f"partition: label(s) {missing} have no transform; transforms are given for {list(transforms)}"
            )
        return {label: [lab == label for lab in labs] for label in transforms}

    def init(params):
        names, leaves, _ = _names_and_leaves(params, None)
        flags = groups(names, leaves, params)
        _record(names, _resolve_labels(labels, params, names, leaves))
        return PartitionState({label: t.init(_select(names, leaves, flags[label])) for label, t in transforms.items()})

    def update(updates, state, params=None, **extra_args):
        names, leaves, treedef = _names_and_leaves(updates, params)
        reference = params if params is not None else updates
        flags = groups(names, tree.leaves(reference), reference)
        p_leaves = None if params is None else tree.leaves(params)
        new_leaves, new_states = list(leaves), {}
        for label, t in transforms.items():
            sel_params = None if p_leaves is None else _select(names, p_leaves, flags[label])
            out, new_states[label] = update_with_extra_args(t, _select(names, leaves, flags[label]),
                                                            state.inner_states[label], sel_params, **extra_args)
            new_leaves = _merge(new_leaves, names, flags[label], out)
        return tree.unflatten(treedef, new_leaves), PartitionState(new_states)

    return GradientTransformationExtraArgs(init, update)


multi_transform = partition


# -- inject_hyperparams --------------------------------------------------------------------------


class InjectHyperparamsState(NamedTuple):
    count: torch.Tensor  # number of updates done, 0-d int64
    hyperparams: dict  # {name: 0-d fp32 tensor}; change a value to steer a compiled step
    inner_state: Any


def _is_schedule(v) -> bool:
    return callable(v) and not isinstance(v, torch.Tensor)


def _is_numeric(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.ndim == 0 and (v.is_floating_point() or not v.dtype == torch.bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def inject_hyperparams(factory: Callable[..., GradientTransformation], static_args: tuple[str, ...] = ()):
    """Wrap an optimizer factory so its numeric hyperparameters live in the state (optax semantics).

    ``inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)`` returns a transformation
    whose state holds ``hyperparams = {"learning_rate": tensor(1e-3), "weight_decay": tensor(0.1)}``
    as 0-d fp32 tensors. Each update rebuilds the inner transformation from those tensors, so
    ``state.opt_state.hyperparams["learning_rate"]`` can be changed between steps (replace the
    tensor, or ``fill_`` it) and a compiled step runs on with the new value, without recompiling.
    Hyperparameters given as schedules (callables of the step count) are evaluated at the update
    count each update and the value is stored in ``hyperparams`` too. Other arguments (bools,
    strings, masks, names in ``static_args``) are passed through unchanged.
    """
    signature = inspect.signature(factory)

    def wrapped(*args, **kwargs) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        numeric = {k: v for k, v in given.items() if k not in static_args and _is_numeric(v)}
        schedules = {k: v for k, v in given.items() if k not in static_args and _is_schedule(v)}
        static = {k: v for k, v in given.items() if k not in numeric and k not in schedules}
        # Validate numbers now (negative learning rate, ...), before they become tensors.
        factory(**static, **numeric, **{k: _scalar(s(torch.zeros((), dtype=torch.int64))) for k, s in schedules.items()})

        def values(hyperparams, count):
            out = dict(hyperparams)
            for k, s in schedules.items():
                out[k] = torch.as_tensor(s(count), dtype=torch.float32, device=count.device)
            return out

        def build(hp):
            return factory(**static, **hp)

        def init(params):
            leaves = tree.leaves(params)
            device = leaves[0].device if leaves else None
            count = torch.zeros((), dtype=torch.int64, device=device)
            hp = {k: torch.as_tensor(v, dtype=torch.float32, device=device).clone() for k, v in numeric.items()}
            hp = values(hp, count)
            return InjectHyperparamsState(count, hp, build(hp).init(params))

        def update(updates, state, params=None, **extra_args):
            hp = values(state.hyperparams, state.count)
            updates, inner_state = update_with_extra_args(build(hp), updates, state.inner_state, params, **extra_args)
            return updates, InjectHyperparamsState(safe_increment(state.count), hp, inner_state)

        return GradientTransformationExtraArgs(init, update)

    wrapped.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    wrapped.__doc__ = factory.__doc__
    return wrapped


def _scalar(v):
    """A schedule's value at step 0 as a Python number for validation (construction time only)."""
    return float(v) if isinstance(v, (torch.Tensor, int, float)) else v


# -- apply_if_finite -----------------------------------------------------------------------------


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: torch.Tensor  # consecutive non-finite updates, 0-d int64
    last_finite: torch.Tensor  # whether the last update was finite, 0-d bool
    total_notfinite: torch.Tensor  # non-finite updates seen in total, 0-d int64
    inner_state: Any


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip updates containing ``inf``/``nan``: return zero updates and keep ``inner``'s state.

    After more than ``max_consecutive_errors`` non-finite updates in a row the update is applied
    anyway (optax semantics). Branch-free: ``inner`` always runs and ``torch.where`` picks the
    result, so a compiled step has one graph and never syncs the host.
    """
    if not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 0:
        raise ValueError(f"max_consecutive_errors must be an int >= 0, got {max_consecutive_errors!r}")

    def init(params):
        leaves = tree.leaves(params)
        device = leaves[0].device if leaves else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=device), zero.clone(), inner.init(params))

    def update(updates, state, params=None, **extra_args):
        finite = tree.all_finite(updates)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), safe_increment(state.notfinite_count))
        apply = finite | (notfinite_count > max_consecutive_errors)
        new_updates, new_inner = update_with_extra_args(inner, updates, state.inner_state, params, **extra_args)
        out = tree.where(apply, new_updates, tree.zeros_like(new_updates))
        inner_state = tree.where(apply, new_inner, state.inner_state)
        total = torch.where(finite, state.total_notfinite, safe_increment(state.total_notfinite))
        return out, ApplyIfFiniteState(notfinite_count, finite.reshape(()), total, inner_state)

    return GradientTransformationExtraArgs(init, update)
