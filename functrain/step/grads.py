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

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from functrain.adapters import outputs as hf_outputs
from functrain.adapters.models import pin_loss_function, prepare_for_differentiation
from functrain.core import tree
from functrain.core.precision import get_policy
from functrain.step import batch as batching
from functrain.step.recompute import uses_checkpointing

LossFn = Callable[[nn.Module, Mapping], Any]  # -> loss | (loss, aux dict)


class WindowGrads(NamedTuple):
    """What :func:`make_grad_fn`'s function returns (all tensors, nothing read on the host)."""

    grads: dict  # summed gradients of the window's mean loss (times ``scale`` when given)
    loss: torch.Tensor  # mean over the window's supervised items
    num_items: torch.Tensor  # supervised items in the window (after ``count_reduce``)
    aux: dict  # the loss_fn's aux values, item-weighted means over the window
    buffers: dict  # the buffers after the window's forwards (the inputs are left unchanged)


def make_grad_fn(model: nn.Module, loss_fn: LossFn | None = None, *, accumulate: int = 1, precision: str = "fp32",
                 count_items: Callable | None = None, grad_reduce: Callable | None = None,
                 count_reduce: Callable | None = None, param_transform: Callable | None = None,
                 differentiate: str = "autograd", compile_forward: Callable | None = None) -> Callable:
    """``grad_fn(params, buffers, batch, scale=None) -> WindowGrads`` for ``model`` and ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(model, microbatch) -> loss`` or ``(loss, aux_dict)``, the MEAN over the
            microbatch's items; default ``model(**batch).loss``.
        accumulate: microbatches per batch (split along dim 0, one in memory at a time).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``: autocast around the forward.
        count_items: ``microbatch -> 0-d tensor`` of supervised items (default: labels != -100).
        grad_reduce, count_reduce: applied once to the summed gradients / the window's count
            (data parallel: all-reduce SUMs, :func:`functrain.distributed.data_parallel_hooks`).
        param_transform: ``(params, has_items) -> params`` applied to the differentiable params
            before binding (sharded mode: :func:`functrain.distributed.gather_params` or
            :func:`functrain.parallel.fsdp.shard_in_use`; its backward reduce-scatters, after
            zeroing the gradients of a microbatch without items, ``has_items`` False).
        differentiate: ``"autograd"`` (``torch.autograd.grad``; activation checkpointing and
            DTensor params work) or ``"func"`` (``torch.func.grad``: composes with ``vmap``).
        compile_forward: ``fn -> compiled fn``. Given, each microbatch's forward (the module bound
            to the params, and the loss) runs compiled, and ``torch.autograd.grad`` runs the
            backward the compiler made for it, as a hand loop over ``torch.compile(model)`` does.
            This is how activation checkpointing compiles with dropout in its regions and with
            several microbatches (torch 2.13 rematerializes neither inside one
            forward-loss-backward graph). A ``param_transform`` runs inside the compiled forward
            (torch 2.13 compiles a whole-model gather there, not per-unit gathers). Not with ``"func"``.
    ``scale`` multiplies the loss before differentiation (the fp16 loss scale).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(accumulate, int) and accumulate >= 1):
        raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
    if differentiate not in ("autograd", "func"):
        raise ValueError(f"differentiate must be 'autograd' or 'func', got {differentiate!r}")
    prepare_for_differentiation(model)
    if differentiate == "func" and param_transform is not None:
        raise ValueError("differentiate='func' (vmapped populations) does not support param_transform "
                         "(sharded DTensor params need torch.autograd.grad)")
    if compile_forward is not None and differentiate == "func":
        raise ValueError("compile_forward needs differentiate='autograd'")
    if differentiate == "func" and uses_checkpointing(model):
        raise ValueError("differentiate='func' (torch.func.grad, used by vmapped populations) cannot run activation "
                         "checkpointing (it forbids saved-tensor hooks); disable checkpointing for this model")
    pin_loss_function(model)
    policy = get_policy(precision)
    count_items = count_items or batching.make_count_items(model)
    grad_reduce = grad_reduce or _identity
    count_reduce = count_reduce or _identity
    bound = _Bound(model, loss_fn or default_loss_fn, policy)
    module_buffers = buffer_names(model)
    micro = (_micro_func if differentiate == "func" else
             _micro_compiled_forward(bound, compile_forward, param_transform) if compile_forward is not None else
             _micro_autograd_transformed(param_transform) if param_transform is not None else _micro_autograd)

    def grad_fn(params: Mapping, buffers: Mapping, batch: Mapping, scale=None) -> WindowGrads:
        # Copies of the module's buffers: a forward that updates them (BatchNorm) leaves the input as it was.
        buffers = {**buffers, **tree.clone(module_buffers_of(buffers, module_buffers))}
        microbatches = batching.split(batch, accumulate)
        counts = [count_items(mb) for mb in microbatches]
        total = count_reduce(torch.stack(counts).sum())  # the one place the window's count is formed
        denom = total.float().clamp_min(1.0)
        grads, loss, aux = None, torch.zeros((), device=denom.device), {}
        for mb, count in zip(microbatches, counts):
            weight = count.float() / denom
            has_items = count > 0  # an empty microbatch's mean is 0/0 = NaN: it contributes nothing
            g, mb_loss, mb_aux, buffers = micro(bound, params, buffers, mb, weight, scale, has_items)
            if param_transform is None:  # (with a transform, g may already hold other ranks' sums)
                g = tree.map(lambda x: torch.where(has_items, x, 0.0), g)
            grads = g if grads is None else tree.add(grads, g)
            loss = loss + torch.where(has_items, mb_loss * weight, 0.0)
            for k, v in mb_aux.items():
                aux[k] = aux.get(k, 0.0) + torch.where(has_items, v * weight, 0.0)
        return WindowGrads(grad_reduce(grads), loss, total, aux, buffers)  # the one place grads are reduced

    return grad_fn


# -- the loss, bound to the module ---------------------------------------------------------------------


def default_loss_fn(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's own loss: ``outputs["loss"]`` of a dict / ``ModelOutput``, ``outputs[0]`` of a tuple
    (HF's convention; see :mod:`functrain.adapters.outputs`)."""
    out = model(**batch, **hf_outputs.no_cache_kwargs(model, batch))
    loss = hf_outputs.loss_of(out)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        found = f"keys {list(out.keys())}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
        raise ValueError(f"{type(model).__name__} returned no loss ({found}; the loss is outputs['loss'] of a dict "
                         "or outputs[0] of a tuple); pass labels in the batch or give make_train_step a "
                         "loss_fn(model, batch)")
    return loss


def split_loss(out) -> tuple[torch.Tensor, dict]:
    """``(fp32 loss, aux dict)`` from what a loss_fn returned, checked."""
    loss, aux = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"loss_fn must return a 0-d tensor (or (loss, aux_dict)), got {loss!r:.80}")
    if not isinstance(aux, Mapping):
        raise TypeError(f"loss_fn's aux must be a dict of tensors, got {type(aux).__name__}")
    return loss.float(), dict(aux)


def autocast(policy, device_type: str):
    if policy.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=policy.compute_dtype)


class LossModule(nn.Module):
    """Holds the user's model so ``functional_call`` binds state tensors to it (``model.*``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class _Bound(LossModule):
    """The loss under autocast and, for ``autograd``, its backward too, INSIDE ``functional_call``'s
    binding: activation checkpointing recomputes forward regions during the backward by reading
    the module's attributes again, which outside the binding are the module's own stale tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, policy):
        super().__init__(model, loss_fn)
        self.policy = policy

    def forward(self, batch, device_type: str, leaves=None, weight=None, scale=None):
        with autocast(self.policy, device_type):  # the forward only, as torch.amp advises
            loss, aux = split_loss(self.loss_fn(self.model, batch))
        if leaves is None:
            return loss, aux
        return torch.autograd.grad(_share(loss, weight, scale), leaves, allow_unused=True), loss, aux


def _micro_autograd(bound, params, buffers, mb, weight, scale, has_items, transform=None):
    """Gradients of one microbatch's share of the window loss (``torch.autograd.grad`` on
    detached copies of the params) and the buffers after its forward."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        bound_params = leaves
        if transform is not None:
            # The transform's backward may reduce gradients across ranks (sharded mode): it gets
            # has_items, since a microbatch without items (NaN loss) must contribute zeros BEFORE
            # that reduction, or its NaN would reach every rank.
            bound_params = transform(leaves, has_items)
        tensors = {**prefixed(bound_params), **prefixed(buffers)}
        grads, loss, aux = torch.func.functional_call(
            bound, tensors, (mb, device_type(params), list(leaves.values()), weight, scale), tie_weights=True)
    return _micro_result(params, grads, loss, aux, written_buffers(tensors, buffers))


def _micro_result(params: Mapping, grads, loss, aux: dict, buffers: dict):
    """A microbatch's ``(grads, loss, aux, buffers)`` from ``torch.autograd.grad``'s tuple: zeros for
    params the loss does not use, the loss and aux values detached."""
    grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    aux = {k: torch.as_tensor(v).detach().float() for k, v in aux.items()}
    return grads, loss.detach(), aux, buffers


def _micro_autograd_transformed(transform):
    def micro(bound, params, buffers, mb, weight, scale, has_items):
        return _micro_autograd(bound, params, buffers, mb, weight, scale, has_items, transform)

    return micro


def _micro_compiled_forward(bound, compile_forward, transform=None):
    """Microbatch gradients from a compiled forward and the compiled backward autograd runs for it.

    The forward binds the params inside the compiled graph, so the regions checkpointing
    recomputes are part of the compiled backward, which reads its saved inputs, never the
    module's attributes (the stale-weights trap :class:`_Bound` avoids in eager). A
    ``transform`` (sharded params' gathers) runs inside the compiled forward too."""

    def forward(params, buffers, mb, has_items):
        if transform is not None:
            params = transform(params, has_items)
        tensors = {**prefixed(params), **prefixed(buffers)}
        loss, aux = torch.func.functional_call(bound, tensors, (mb, device_type(params)), tie_weights=True)
        return loss, aux, written_buffers(tensors, buffers)

    compiled = compile_forward(forward)

    def micro(bound, params, buffers, mb, weight, scale, has_items):
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss, aux, new_buffers = compiled(leaves, buffers, mb, has_items)
            grads = torch.autograd.grad(_share(loss, weight, scale), list(leaves.values()), allow_unused=True)
        return _micro_result(params, grads, loss, aux, {k: v.detach() for k, v in new_buffers.items()})

    return micro


def _micro_func(bound, params, buffers, mb, weight, scale, has_items):
    """The same with ``torch.func.grad`` (pure: composes with ``vmap``); zeros for unused params."""

    def share_of(p, b):  # b: the buffers as an input, so the forward may update them (BatchNorm)
        tensors = {**prefixed(p), **prefixed(b)}
        loss, aux = torch.func.functional_call(bound, tensors, (mb, device_type(p)), tie_weights=True)
        aux = {k: torch.as_tensor(v).float() for k, v in aux.items()}
        return _share(loss, weight, scale), (loss, aux, written_buffers(tensors, b))

    grads, (loss, aux, new_buffers) = torch.func.grad(share_of, has_aux=True)(dict(params), buffers)
    return grads, loss, aux, new_buffers


def _share(loss, weight, scale):
    share = loss * weight
    return share if scale is None else share * scale


def _identity(x):
    return x


# -- names ----------------------------------------------------------------------------------------------


def prefixed(d: Mapping) -> dict:
    return {"model." + k: v for k, v in d.items()}


def buffer_names(model: nn.Module) -> tuple:
    """Names of the module's registered buffers: the state tensors a forward may write (frozen
    parameters, also in ``state.buffers``, are inputs only and are never copied)."""
    return tuple(name for name, _ in model.named_buffers())


def module_buffers_of(buffers: Mapping, names: tuple) -> dict:
    return {k: buffers[k] for k in names if k in buffers}


def written_buffers(bound: Mapping, buffers: Mapping) -> dict:
    """The buffers ``functional_call`` left in ``bound`` (it writes back tensors the forward
    reassigned, e.g. ``self.count = self.count + 1``; in-place updates are already there)."""
    return {k: bound["model." + k] for k in buffers}


def device_type(params: Mapping) -> str:
    return next(iter(params.values())).device.type
