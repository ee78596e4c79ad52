"""The one dispatch for the multi-tensor ops that the tree helpers and optimizers call.

``foreach.add(xs, ys)`` is ``torch._foreach_add(xs, ys)`` (one fused kernel over a list of
tensors: fast in eager mode, one loop in a compiled graph). Inside :func:`per_tensor` it is
``[torch.add(x, y) for x, y in zip(xs, ys)]`` instead, for this thread only. The population step
needs that: ``torch._foreach_*`` ops have no ``torch.func.vmap`` batching rule, and their Scalar
arguments call ``.item()`` on tensor hyperparameters (an error under vmap).

The switch is a thread-local flag read by these functions, never a rebinding of torch's own
functions: other threads and other libraries always get the fused kernels. ``torch.compile``
guards on the flag, so a graph traced per tensor is not reused for a fused call (or vice versa).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

__all__ = ["per_tensor", "per_tensor_active"]

_mode = threading.local()


def per_tensor_active() -> bool:
    """Whether this thread's calls run per tensor (inside :func:`per_tensor`)."""
    return getattr(_mode, "per_tensor", False)


@contextlib.contextmanager
def per_tensor():
    """Run this thread's ``foreach.*`` calls as per-tensor ops until the block ends (re-entrant)."""
    before = per_tensor_active()
    _mode.per_tensor = True
    try:
        yield
    finally:
        _mode.per_tensor = before


def _per_tensor_fn(name: str) -> Callable:
    """The single-tensor op that ``_foreach_<name>`` applies to each element of its lists."""
    inplace = name.endswith("_")
    if name == "norm":
        def norm(x, ord=2, dtype=None):  # noqa: A002 - aten's argument name
            return torch.linalg.vector_norm(x, ord, dtype=dtype)
        return norm
    if name.rstrip("_") in ("addcmul", "addcdiv"):
        # vmap has no batching rule for in-place addcmul_/addcdiv_ (a slow per-member fallback).
        combine = torch.mul if name.startswith("addcmul") else torch.div

        def addc(x, t1, t2, value=1):
            return x.add_(combine(t1, t2) * value) if inplace else x + combine(t1, t2) * value
        return addc
    return getattr(torch.Tensor, name) if inplace else getattr(torch, name)


def _pick(arg, i: int):
    return arg[i] if isinstance(arg, (list, tuple)) else arg


def _op(name: str) -> Callable:
    fused = getattr(torch, f"_foreach_{name}")
    single = _per_tensor_fn(name)
    inplace = name.endswith("_")

    def dispatch(*args, **kwargs):
        if not per_tensor_active():
            return fused(*args, **kwargs)
        # List arguments are zipped, the others (scalars, 0-d tensors) broadcast to every element.
        n = next(len(a) for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)))
        out = [single(*[_pick(a, i) for a in args], **{k: _pick(v, i) for k, v in kwargs.items()})
               for i in range(n)]
        return None if inplace else out

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__doc__ = f"``torch._foreach_{name}``, or per tensor inside :func:`per_tensor`."
    return dispatch


add, add_ = _op("add"), _op("add_")
sub, sub_ = _op("sub"), _op("sub_")
mul, mul_ = _op("mul"), _op("mul_")
div, div_ = _op("div"), _op("div_")
sqrt, sqrt_ = _op("sqrt"), _op("sqrt_")
lerp, lerp_ = _op("lerp"), _op("lerp_")
maximum, minimum = _op("maximum"), _op("minimum")
addcmul, addcmul_ = _op("addcmul"), _op("addcmul_")
addcdiv, addcdiv_ = _op("addcdiv"), _op("addcdiv_")
norm, sign, abs, neg, exp = _op("norm"), _op("sign"), _op("abs"), _op("neg"), _op("exp")  # noqa: A001
copy_, zero_ = _op("copy_"), _op("zero_")
clamp_min, clamp_max = _op("clamp_min"), _op("clamp_max")
pow, reciprocal = _op("pow"), _op("reciprocal")  # noqa: A001

__all__ += ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "sqrt", "sqrt_", "lerp", "lerp_",
            "maximum", "minimum", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "norm", "sign",
            "abs", "neg", "exp", "copy_", "zero_", "clamp_min", "clamp_max", "pow", "reciprocal"]
