"""Gradients of a window: the first building block of a training step.

    grad_fn = make_grad_fn(model, loss_fn, accumulate=2, precision="bf16")
    g = grad_fn(state.params, state.buffers, batch)      # WindowGrads(grads, loss, num_items, aux, buffers)

``grad_fn`` binds the given params and buffers to ``model`` (``torch.func.functional_call``), so
``loss_fn(model, microbatch)`` runs the module on the state's tensors, never on its own. The batch
is split into ``accumulate`` microbatches; their gradients are summed, each weighted by its share
of the window's supervised items, so the result is the gradient of the mean loss over the whole
window (not a mean of microbatch means). It is pure (the inputs are not modified: the buffers a
forward writes, BatchNorm's running statistics, come back in ``.buffers``) and traces whole under
``torch.compile``. :func:`functrain.make_train_step` is this, then :mod:`functrain.step.update`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple

import torch
from torch import nn

from functrain.core import tree
from functrain.core.precision import get_policy
from functrain.step import batch as batching


class WindowGrads(NamedTuple):
    """What :func:`make_grad_fn`'s function returns (all tensors, nothing read on the host)."""

    grads: dict  # summed gradients of the window's mean loss (times ``scale`` when given)
    loss: torch.Tensor  # mean over the window's supervised items
    num_items: torch.Tensor  # supervised items in the window (after ``count_reduce``)
    aux: dict  # the loss_fn's aux values, item-weighted means over the window
    buffers: dict  # the buffers after the window's forwards (inputs are left unchanged)


def make_grad_fn(model: nn.Module, loss_fn: Callable | None = None, *, accumulate: int = 1, precision: str = "fp32",
                 count_items: Callable | None = None, grad_reduce: Callable | None = None,
                 count_reduce: Callable | None = None, differentiate: str = "autograd") -> Callable:
    """``grad_fn(params, buffers, batch, scale=None) -> WindowGrads`` for ``model`` and ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(model, microbatch) -> loss`` or ``(loss, aux_dict)``, the MEAN over the
            microbatch's items; default ``model(**batch).loss``.
        accumulate: microbatches per batch (split along dim 0, one in memory at a time).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``: autocast around the forward.
        count_items: ``microbatch -> 0-d tensor`` of supervised items (default: labels != -100).
        grad_reduce, count_reduce: applied once to the summed gradients / the window's count
            (data parallel: all-reduce SUMs, :func:`functrain.distributed.data_parallel_hooks`).
        differentiate: ``"autograd"`` (``torch.autograd.grad``; activation checkpointing works) or
            ``"func"`` (``torch.func.grad``: composes with ``vmap``, no checkpointing).
    ``scale`` multiplies the loss before differentiation (the fp16 loss scale).
    """
    from functrain.step.train import _check_checkpointing, _pin_hf_loss_function, default_loss_fn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(accumulate, int) and accumulate >= 1):
        raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
    if differentiate not in ("autograd", "func"):
        raise ValueError(f"differentiate must be 'autograd' or 'func', got {differentiate!r}")
    _check_checkpointing(model)
    _pin_hf_loss_function(model)
    policy = get_policy(precision)
    count_items = count_items or batching.make_count_items(model)
    grad_reduce = grad_reduce or (lambda g: g)
    count_reduce = count_reduce or (lambda c: c)
    bound = _Bound(model, loss_fn or default_loss_fn, policy)
    micro = _micro_autograd if differentiate == "autograd" else _micro_func
    module_buffers = tuple(name for name, _ in model.named_buffers())  # what a forward may write

    def grad_fn(params: Mapping, buffers: Mapping, batch: Mapping, scale=None) -> WindowGrads:
        # Copies of the module's buffers: a forward that updates them (BatchNorm) leaves the input as it was.
        buffers = {**buffers, **{k: buffers[k].clone() for k in module_buffers if k in buffers}}
        microbatches = batching.split(batch, accumulate)
        counts = [count_items(mb) for mb in microbatches]
        total = count_reduce(torch.stack(counts).sum())  # the one place the window's count is formed
        denom = total.float().clamp_min(1.0)
        grads, loss, aux = None, torch.zeros((), device=denom.device), {}
        for mb, count in zip(microbatches, counts):
            weight = count.float() / denom
            has_items = count > 0  # an empty microbatch's mean is 0/0: it contributes nothing
            g, mb_loss, mb_aux, buffers = micro(bound, params, buffers, mb, weight, scale)
            g = tree.map(lambda x: torch.where(has_items, x, 0.0), g)
            grads = g if grads is None else tree.add(grads, g)
            loss = loss + torch.where(has_items, mb_loss * weight, 0.0)
            for k, v in mb_aux.items():
                aux[k] = aux.get(k, 0.0) + torch.where(has_items, v * weight, 0.0)
        return WindowGrads(grad_reduce(grads), loss, total, aux, dict(buffers))

    return grad_fn


class _Bound(nn.Module):
    """Holds the user's model so ``functional_call`` binds the state's tensors to ``model.*``; its
    forward runs the loss and, for ``autograd``, its backward too, inside the binding (activation
    checkpointing recomputes regions during the backward and must see the bound tensors)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, policy):
        super().__init__()
        self.model, self.loss_fn, self.policy = model, loss_fn, policy

    def forward(self, batch, device_type: str, leaves=None, weight=None, scale=None):
        from functrain.step.train import _autocast, _split_loss

        with _autocast(self.policy, device_type):  # the forward only, as torch.amp advises
            loss, aux = _split_loss(self.loss_fn(self.model, batch))
        if leaves is None:
            return loss, aux
        share = _share(loss, weight, scale)
        return torch.autograd.grad(share, leaves, allow_unused=True), loss, aux


def _micro_autograd(bound, params, buffers, mb, weight, scale):
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        tensors = {**_prefixed(leaves), **_prefixed(buffers)}
        grads, loss, aux = torch.func.functional_call(
            bound, tensors, (mb, _device_type(params), list(leaves.values()), weight, scale), tie_weights=True)
    grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    aux = {k: torch.as_tensor(v).detach().float() for k, v in aux.items()}
    return grads, loss.detach(), aux, _written_buffers(tensors, buffers)


def _micro_func(bound, params, buffers, mb, weight, scale):
    def share_of(p):
        tensors = {**_prefixed(p), **_prefixed(buffers)}
        loss, aux = torch.func.functional_call(bound, tensors, (mb, _device_type(p)), tie_weights=True)
        aux = {k: torch.as_tensor(v).float() for k, v in aux.items()}
        return _share(loss, weight, scale), (loss, aux, _written_buffers(tensors, buffers))

    grads, (loss, aux, new_buffers) = torch.func.grad(share_of, has_aux=True)(dict(params))
    return grads, loss, aux, new_buffers


def _share(loss, weight, scale):
    share = loss * weight
    return share if scale is None else share * scale


def _prefixed(d: Mapping) -> dict:
    return {"model." + k: v for k, v in d.items()}


def _written_buffers(tensors: Mapping, buffers: Mapping) -> dict:
    """The buffers after a forward: ``functional_call`` writes back reassigned tensors into the
    dict it was given (in-place updates are there already)."""
    return {k: tensors["model." + k] for k in buffers}


def _device_type(params: Mapping) -> str:
    return next(iter(params.values())).device.type
