"""Thin helpers over optree for the pytrees functrain passes around.

A pytree here is any nesting of dicts, lists, tuples, NamedTuples and registered dataclasses
(``TrainState``) whose leaves are tensors (or ``None``, which optree treats as an empty subtree).
Parameters are flat ``dict[str, Tensor]`` keyed by the module's parameter names, so a leaf's
path reads like ``"transformer.h.0.attn.c_attn.weight"``.

Functions that act on many leaves use the multi-tensor ops of :mod:`functrain.core.foreach`
(``torch._foreach_*`` kernels) so that eager mode is fast and compiled mode sees one fused op per group.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import optree
import torch

from functrain.core import foreach

NAMESPACE = "functrain"

PyTree = Any


def leaves(tree: PyTree) -> list:
    """The leaves of ``tree`` in optree's canonical order (``None`` subtrees are dropped)."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def flatten(tree: PyTree):
    """``(leaves, treedef)``; ``unflatten(treedef, leaves)`` rebuilds the same types exactly."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def unflatten(treedef, new_leaves: Iterable) -> PyTree:
    return optree.tree_unflatten(treedef, list(new_leaves))


def structure(tree: PyTree):
    return optree.tree_structure(tree, namespace=NAMESPACE)


def map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:  # noqa: A001 - mirrors jax.tree.map
    """Apply ``fn`` leaf-wise over ``tree`` and trees of the same structure."""
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def paths(tree: PyTree) -> list[str]:
    """Dotted names of the leaves, in ``leaves`` order (``"opt_state.0.mu.lm_head.weight"``)."""
    keypaths, _, _ = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return [".".join(str(k) for k in path) for path in keypaths]


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """``{dotted path: leaf}``; the path joins dict keys, sequence indices and field names."""
    return dict(zip(paths(tree), leaves(tree)))


def assert_same_structure(a: PyTree, b: PyTree, what_a: str = "first", what_b: str = "second"):
    """Raise ``ValueError`` naming both trees and the leaves found in only one of them."""
    sa, sb = structure(a), structure(b)
    if sa != sb:
        names_a, names_b = set(paths(a)), set(paths(b))
        only_a = sorted(names_a - names_b)[:5]
        only_b = sorted(names_b - names_a)[:5]
        if only_a or only_b:
            detail = f"only in {what_a}: {only_a}, only in {what_b}: {only_b}"
        else:
            detail = "same leaf names, different containers"
        # The leaf names come first: a treedef of a real model runs to thousands of characters.
        raise ValueError(
            f"{what_a} and {what_b} must have the same tree structure; {detail}; "
            f"got {_shorten(str(sa))} and {_shorten(str(sb))}"
        )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree) -> PyTree:
    return map(torch.ones_like, tree)


def full_like(tree: PyTree, value: float) -> PyTree:
    return map(lambda x: torch.full_like(x, value), tree)


def cast(tree: PyTree, dtype: torch.dtype, only_floating: bool = True) -> PyTree:
    """Cast floating leaves (or all leaves with ``only_floating=False``) to ``dtype``."""

    def _cast(x):
        if only_floating and not torch.is_floating_point(x):
            return x
        return x.to(dtype)

    return map(_cast, tree)


def clone(tree: PyTree) -> PyTree:
    return map(lambda x: x.clone(), tree)


def detach(tree: PyTree) -> PyTree:
    return map(lambda x: x.detach(), tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The l2 norm of all leaves taken together, as a 0-d fp32 tensor (no host sync)."""
    ls = leaves(tree)
    if not ls:
        return torch.zeros((), dtype=torch.float32)
    norms = foreach.norm([x.float() if x.dtype != torch.float32 else x for x in ls])
    return torch.linalg.vector_norm(torch.stack(norms))


def all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: every element of every leaf is finite (no host sync)."""
    # Integer and bool leaves are always finite; the max-norm of an empty tensor is undefined.
    ls = [x for x in leaves(tree) if (x.is_floating_point() or x.is_complex()) and x.numel() > 0]
    if not ls:
        return torch.ones((), dtype=torch.bool)
    # Every element is finite iff the extremes are (nan and inf propagate through min/max); unlike
    # an l2 norm this cannot overflow on large finite values. No fp32 copies.
    if ls[0].device.type == "cpu" and not any(x.is_complex() for x in ls):
        # On the CPU torch's inf-norm is a slow scalar loop (measured 1.4 ms vs 77 us for aminmax over
        # 0.5M floats, 1 thread) and _foreach_norm runs it per tensor anyway.
        extremes = [torch.stack(torch.aminmax(x)).float() for x in ls]
        return torch.isfinite(torch.cat(extremes)).all()
    max_abs = foreach.norm(ls, ord=float("inf"))  # one fused kernel on accelerators
    return torch.isfinite(torch.stack([m.float() for m in max_abs]).max())


def where(cond: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise ``torch.where(cond, a, b)`` with a 0-d ``cond``; keeps branch-free graphs."""
    return map(lambda a, b: torch.where(cond, a, b), on_true, on_false)


def scale(tree: PyTree, factor) -> PyTree:
    """Multiply every leaf by ``factor`` (a number or 0-d tensor), out of place."""
    ls, treedef = flatten(tree)
    if not ls:
        return tree
    return unflatten(treedef, foreach.mul(ls, factor))


def add(a: PyTree, b: PyTree) -> PyTree:
    la, treedef = flatten(a)
    if not la:
        return a
    return unflatten(treedef, foreach.add(la, leaves(b)))


def sub(a: PyTree, b: PyTree) -> PyTree:
    la, treedef = flatten(a)
    if not la:
        return a
    return unflatten(treedef, foreach.sub(la, leaves(b)))


def copy_(dst: PyTree, src: PyTree) -> None:
    """Write ``src`` into ``dst``'s storages (used by donation); structures must match."""
    ld, ls = leaves(dst), leaves(src)
    if ld:
        foreach.copy_(ld, ls)


def size(tree: PyTree) -> int:
    """Total number of elements over all leaves."""
    return sum(x.numel() for x in leaves(tree))


def nbytes(tree: PyTree) -> int:
    return sum(x.numel() * x.element_size() for x in leaves(tree))


def tensors_equal(a: PyTree, b: PyTree) -> bool:
    """Structures equal and every leaf bitwise equal (host sync: for tests and checks only)."""
    if structure(a) != structure(b):
        return False
    return all(torch.equal(x, y) for x, y in zip(leaves(a), leaves(b)))


def relative_difference(a: PyTree, b: PyTree) -> float:
    """``||a - b|| / ||b||`` over all leaves together (host sync: for tests and checks only)."""
    la = [x.detach().double() for x in leaves(a)]
    lb = [x.detach().double() for x in leaves(b)]
    num = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x - y) for x, y in zip(la, lb)]))
    den = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y) for y in lb]))
    return float(num / den.clamp_min(1e-30))
