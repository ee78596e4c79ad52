"""The pure training step: ``train_step(state, batch) -> (new_state, metrics)``.

Read :func:`make_train_step` top to bottom: ``train_core`` is every operation that touches the
state, in order, as the public blocks: the window's gradients (:func:`functrain.step.make_grad_fn`:
split, count items, per-microbatch gradients, reduce), then :mod:`functrain.step.update`
(unscale, norm, clip, optimizer update, loss-scale bookkeeping), then the donation copy. The
returned ``train_step`` wraps it with what cannot be traced: batch validation (host metadata
only), the explicit RNG key and the module's train/eval mode. See ``docs/step.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from functrain.adapters import outputs as hf_outputs
from functrain.adapters.models import pin_loss_function
from functrain.core import rng as rnglib
from functrain.core import foreach, tree
from functrain.core.optim.fused_adamw import fused_adamw_, fused_adamw_applies, fused_adamw_of
from functrain.core.optim.transforms import clip_factor
from functrain.core.precision import DynamicScale, dynamic_scale_init, get_policy
from functrain.core.state import TrainState
from functrain.step import batch as batching
from functrain.step.grads import (
    LossFn, LossModule, autocast, buffer_names, default_loss_fn, device_type, make_grad_fn, module_buffers_of, prefixed,
)
from functrain.step.flat import FlatCores
from functrain.step import grouped_update
from functrain.step.grouped_update import apply_update_in_groups_
from functrain.step.recompute import uses_checkpointing
from functrain.step.update import apply_update, keep_if_finite, unscale_grads

__all__ = ["default_loss_fn", "find_learning_rate", "make_eval_step", "make_train_step"]


# -- the train step ------------------------------------------------------------------------------


def make_train_step(
    model: nn.Module,
    tx,
    loss_fn: LossFn | None = None,
    *,
    accumulate: int = 1,
    precision: str = "fp32",
    compile: bool = False,  # noqa: A002 - the natural name, mirrors torch.compile
    donate: bool = False,
    count_items: Callable[[Mapping], torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
    grad_reduce: Callable | None = None,
    count_reduce: Callable | None = None,
    param_transform: Callable | None = None,
    required_keys=None,
    compile_kwargs: dict | None = None,
    differentiate: str = "autograd",
    rng_stream: int = 0,
    skip_non_finite: bool = False,
    deterministic: bool = False,
    leafwise_update: bool = False,
    flat: bool = False,
):
    """Build ``train_step(state, batch) -> (new_state, metrics)``, a pure function.

    Args:
        model: the ``nn.Module``; only its structure is used, the tensors come from the state.
        tx: a :class:`functrain.optim.GradientTransformation`.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, aux_dict)``, called with the state's
            params and buffers bound to ``model``; ``loss`` is the MEAN over the microbatch's
            supervised items. Default: the model's own loss (``outputs["loss"]``, or ``outputs[0]`` of
            a tuple). (HF ``Trainer.compute_loss``
            overrides have this shape.)
        accumulate: number of microbatches the batch is split into along dim 0; gradients are
            summed microbatch by microbatch (one microbatch of activations in memory at a time).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast compute, fp32 params; fp16
            adds a dynamic loss scale kept in ``state.loss_scale``).
        compile: compile the whole step with ``torch.compile(fullgraph=True)`` (with
            ``donate=True`` and ``leafwise_update=True``: the window's gradients only, see there).
            A model with activation checkpointing compiles each microbatch's forward instead (a
            ``param_transform`` inside it), its backward compiled with it, as ``torch.compile(model)``
            does: torch 2.13 cannot recompute checkpointed regions that draw random numbers
            (dropout), or those of several microbatches, inside one forward-loss-backward graph.
            The accumulation and the update then run eagerly around it.
        donate: write the new params and optimizer state into the input state's storages; the
            input state is then consumed (any use raises ``ConsumedStateError``).
        count_items: ``count_items(microbatch) -> 0-d tensor`` of supervised items; default
            counts ``labels != -100`` as the HF Trainer does (see :mod:`functrain.step.batch`).
        max_grad_norm: clip gradients to this global norm before ``tx`` (as HF's
            ``max_grad_norm``); ``None``: no clipping here (``tx`` may clip itself).
        grad_reduce: applied once to the summed gradients (default identity). For data parallel,
            an all-reduce SUM: each rank's gradients are already divided by the GLOBAL count.
        count_reduce: applied once to the local item count of the window (default identity);
            for data parallel, an all-reduce SUM.
        param_transform: ``(params, has_items) -> params`` applied to the (differentiable)
            params right before they are bound to the model (default identity); ``has_items`` is
            a 0-d bool, False for a microbatch without supervised items, whose gradients a
            transform that reduces across ranks must zero before reducing. Sharded mode
            (:func:`functrain.distributed.gather_params`, or per unit
            :func:`functrain.parallel.fsdp.shard_in_use`) all-gathers ``DTensor`` shards, so
            gradients come back sharded; the optimizer update still sees the state's own tensors.
        required_keys: batch keys the loss needs (checked before the step runs). Default:
            ``("labels",)`` with the default loss, none with a custom ``loss_fn``.
        compile_kwargs: extra keyword arguments for ``torch.compile``.
        differentiate: ``"autograd"`` (default: ``torch.autograd.grad``, works with activation
            checkpointing and DTensor params) or ``"func"`` (``torch.func.grad``: composes with
            ``torch.func.vmap``, as the population step in :mod:`functrain.population` needs; no
            activation checkpointing).
        deterministic: run (and compile) the step with ``torch.use_deterministic_algorithms(True)``
            (and inductor's ``deterministic`` option): a compiled step is then bitwise repeatable
            on any thread count (see ``_deterministic_algorithms``). Eager CPU steps are already.
        rng_stream: folded into the state's key before seeding (0: the key as is). Data-parallel
            ranks pass their rank so each draws its own dropout masks from the same state.
        leafwise_update: declare that ``tx`` updates each parameter from its own gradient, state
            and value alone (Adam(W), SGD, Lion, RMSprop, Adagrad; not a global-norm clip or
            ``apply_if_finite`` inside ``tx``; weight-decay masks given as functions of the params).
            With ``donate=True`` the update then runs a group of parameters at a time, in place,
            so training holds one copy of params and optimizer state plus one group's temporaries
            (same numbers; see :mod:`functrain.step.grouped_update`). Compiled, only the window's
            gradients are compiled and this update runs after the graph (a whole compiled graph
            returns a second copy of params and optimizer state). Ignored without donation and
            with fp16; with ``flat=True`` it cuts the segments into pieces (eager) or is ignored
            (compiled: flat's whole graph).
        skip_non_finite: when the window's loss or any gradient is NaN/Inf, keep params, optimizer
            state and step unchanged and report ``skipped`` (fp16 always does this, for its loss
            scale). Decided on the device: no host sync.
        flat: run the optimizer update, the global norm and clipping over flat segments (one
            contiguous buffer per dtype, device and optimizer treatment; see
            :mod:`functrain.core.flat`): a few kernels per operation instead of one per tensor.
            The state keeps its names and shapes (its tensors are views into the segments); a
            state that is not flat yet is copied into segments on the first call (use
            ``functrain.flat.flatten_state(state, tx, model)`` to keep the module's parameters as
            the storage). Needs an elementwise ``tx`` (Adam(W), SGD, Lion, RMSprop, Adagrad, global
            clipping; masks by name); not with populations (``differentiate="func"``) or sharded
            params (``param_transform``).

    Metrics (0-d tensors, never read on the host by the step): ``loss`` (mean over the
    supervised items of the whole window), ``grad_norm`` (global norm before clipping),
    ``learning_rate`` (when the optimizer state records one), ``num_items``; with fp16
    ``loss_scale`` and ``skipped``; plus the loss_fn's aux entries (item-weighted means).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    policy = get_policy(precision)
    user_loss = loss_fn is not None
    required_keys = tuple(required_keys) if required_keys is not None else (() if user_loss else ("labels",))
    forward_keys = None if user_loss else batching.forward_argument_names(model)
    # Activation checkpointing: compile the forward (and its backward), not the whole step.
    compile_forward = compile and differentiate == "autograd" and uses_checkpointing(model)
    if compile_forward:
        compile = False  # the accumulation and the update around the compiled forwards run eagerly
    if compile and accumulate > 1 and getattr(param_transform, "recomputes", False):
        # A transform that recomputes in backward (per-unit sharded gathers) hits the same limit.
        raise ValueError(f"compile=True with accumulate > 1 cannot use {type(param_transform).__name__} in torch "
                         f"{torch.__version__} (it recomputes each unit in backward; one recompute region per "
                         "graph): use accumulate=1, compile=False, or gather before the forward "
                         "(functrain.distributed.sharded_hooks())")
    if compile and getattr(param_transform, "recomputes", False) and getattr(param_transform, "mixed", None):
        # Its bf16 gather is a custom autograd.Function; inductor's remat pass then sees one recompute
        # region per unit ("remat only supports one such region in a forward-loss-backward graph").
        raise ValueError(f"compile=True cannot use {type(param_transform).__name__} with mixed-precision gathers in "
                         f"torch {torch.__version__} (the compiler cannot recompute them unit by unit): use "
                         "compile=False, or gather before the forward (functrain.distributed.gather_params with "
                         "mixed=...)")
    if flat and differentiate == "func":
        raise ValueError("flat=True cannot run under torch.func (populations vmap per-tensor states); use flat=False")
    if flat and param_transform is not None:
        raise ValueError("flat=True cannot run with param_transform (sharded params are DTensor shards, not views of "
                         "a flat buffer); use flat=False")
    # The blocks (functrain.step.grads / .update): gradients of the window, the update, the loss scale.
    grad_fn = make_grad_fn(model, loss_fn, accumulate=accumulate, precision=precision, count_items=count_items,
                           grad_reduce=grad_reduce, count_reduce=count_reduce, param_transform=param_transform,
                           differentiate=differentiate,
                           compile_forward=(lambda fn: _maybe_compile(fn, True, compile_kwargs, deterministic))
                           if compile_forward else None)
    module_buffers = buffer_names(model)
    grouped = leafwise_update and donate and not compile and not policy.needs_loss_scale
    # Compiled, donated and leafwise: only the gradients are compiled and the grouped in-place
    # update runs after the graph, so the step never holds a second copy of params and optimizer
    # state (a whole compiled step returns one, written back after the graph: see below).
    split_compiled = leafwise_update and donate and compile and not policy.needs_loss_scale
    # A compiled step returns new tensors and the donation is written back eagerly after it:
    # torch 2.13's inductor can compute an output from an input the same graph has already
    # overwritten (an EMA from the new params, a schedule's rate from the new count), so copies
    # into the inputs inside the graph give wrong numbers (tests/test_step_donation.py).
    donate_in_graph = donate and not compile

    def window_grads(params, buffers, loss_scale, batch, layout=None):
        # layout (flat=True): params and per-parameter optimizer state come as flat segments; the
        # forward binds views of them and the gradients are packed the same way before the update.
        scale = loss_scale.scale if policy.needs_loss_scale else None
        g = grad_fn(params if layout is None else layout.views(params), buffers, batch, scale)
        return g if layout is None else g._replace(grads=layout.pack(g.grads))

    def grouped_core(params, buffers, opt_state, step, loss_scale, g):
        # donated, leafwise tx: params and opt_state updated in place, a group at a time
        old_buffers, new_buffers = module_buffers_of(buffers, module_buffers), module_buffers_of(g.buffers, module_buffers)
        metrics = {"loss": g.loss, "num_items": g.num_items}
        new_buffers, metrics["grad_norm"], finite = _update_in_place(
            tx, params, opt_state, step, g.grads, g.loss, old_buffers, new_buffers,
            max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite)
        metrics.update(_update_metrics(opt_state, finite, None), **g.aux)
        if old_buffers:
            tree.copy_(old_buffers, new_buffers)
        return params, old_buffers, opt_state, step, loss_scale, metrics

    def train_core(params, buffers, opt_state, step, loss_scale, batch, layout=None):
        if grouped:  # (g is not kept here: its gradients are dropped group by group)
            return grouped_core(params, buffers, opt_state, step, loss_scale,
                                window_grads(params, buffers, loss_scale, batch, layout))
        g = window_grads(params, buffers, loss_scale, batch, layout)
        # The module's buffers (BatchNorm running statistics, ...) are outputs of the step: the
        # forward updated copies, so the input state's buffers never change.
        old_buffers, new_buffers = module_buffers_of(buffers, module_buffers), module_buffers_of(g.buffers, module_buffers)
        grads = g.grads
        metrics = {"loss": g.loss, "num_items": g.num_items}
        (new_params, new_opt_state, new_buffers, new_step, new_loss_scale), metrics["grad_norm"], finite = _update(
            tx, (params, opt_state, old_buffers, step, loss_scale), grads, g.loss, new_buffers,
            max_grad_norm=max_grad_norm, needs_loss_scale=policy.needs_loss_scale, skip_non_finite=skip_non_finite)
        metrics.update(_update_metrics(new_opt_state, finite, new_loss_scale if policy.needs_loss_scale else None))
        metrics.update(g.aux)
        if donate_in_graph:
            # Write the results into the input storages (eager: one copy alive after the update).
            tree.copy_((params, opt_state, step, loss_scale), (new_params, new_opt_state, new_step, new_loss_scale))
            if old_buffers:  # (dynamo cannot flatten an empty dict here)
                tree.copy_(old_buffers, new_buffers)
            return params, old_buffers, opt_state, step, loss_scale, metrics
        return new_params, new_buffers, new_opt_state, new_step, new_loss_scale, metrics

    def build_core(layout=None):
        # flat (a layout): the graph binds views of the segments and packs the gradients; split, the
        # in-place update after it is then one fused kernel per segment (no segment written back).
        on = (lambda fn: fn) if layout is None else (lambda fn: functools.partial(fn, layout=layout))
        if split_compiled:
            return _split_compiled_core(_maybe_compile(on(window_grads), True, compile_kwargs, deterministic),
                                        grouped_core)
        return _maybe_compile(on(train_core), compile, compile_kwargs, deterministic)

    core = build_core()
    flat_steps = FlatCores(tx, build_core, pieces=grouped_update.GROUPS if grouped else 1) if flat else None

    def train_step(state: TrainState, batch: Mapping):
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
        batching.validate(batch, accumulate=accumulate, required_keys=required_keys, model=model,
                          forward_keys=forward_keys)
        loss_scale = state.loss_scale
        if policy.needs_loss_scale and loss_scale is None:
            loss_scale = dynamic_scale_init(device=state.step.device)
        if policy.needs_loss_scale and not isinstance(loss_scale, DynamicScale):
            raise TypeError(f"precision='fp16' needs state.loss_scale to be a DynamicScale, got {type(loss_scale).__name__}")
        key = rnglib.fold_in(state.rng, rng_stream) if rng_stream else state.rng
        with rnglib.seeded(key), _module_mode(model, training=True):
            if flat:
                prepared = flat_steps.prepare(state)
                inputs = (prepared[0], state.buffers, prepared[1], state.step, loss_scale)
                outputs = prepared[2](*inputs, dict(batch))
                params, buffers, opt_state, step, loss_scale, metrics = _donated(outputs, inputs, donate, module_buffers)
                params, opt_state = flat_steps.finish(prepared, params, opt_state, donate)
            else:
                inputs = (state.params, state.buffers, state.opt_state, state.step, loss_scale)
                outputs = core(*inputs, dict(batch))
                params, buffers, opt_state, step, loss_scale, metrics = _donated(outputs, inputs, donate, module_buffers)
        new_state = state.replace(params=params, buffers={**state.buffers, **buffers}, opt_state=opt_state, step=step,
                                  loss_scale=loss_scale, rng=rnglib.next_key(state.rng))
        if donate:
            state.mark_consumed("a train_step built with donate=True")
        return new_state, metrics

    train_step.core = core  # for tests and tools (e.g. torch._dynamo.explain)
    train_step.pure_core = train_core  # uncompiled, no RNG/mode handling: for transforms (vmap)
    return train_step


def _split_compiled_core(compiled_grads, grouped_core):
    """A core of two parts: the compiled window gradients, then ``grouped_core`` (eager, in place)."""

    def core(params, buffers, opt_state, step, loss_scale, batch):
        return grouped_core(params, buffers, opt_state, step, loss_scale,
                            compiled_grads(params, buffers, loss_scale, batch))

    core.compiled = compiled_grads.compiled
    return core


def _update(tx, old: tuple, grads, loss, new_buffers, *, max_grad_norm, needs_loss_scale: bool,
            skip_non_finite: bool):
    """The update after a window's gradients: ``((params, opt_state, buffers, step, loss_scale),
    grad_norm, finite)`` from ``old = (params, opt_state, buffers, step, loss_scale)``.

    fp16 (``needs_loss_scale``): a non-finite step changes nothing but the loss scale (params,
    optimizer state, hence the schedule position, buffers and the step counter keep their
    values). ``skip_non_finite``: a non-finite step changes nothing. ``finite`` is ``None`` when
    neither applies."""
    params, opt_state, old_buffers, step, loss_scale = old
    finite = None
    if needs_loss_scale:
        grads, finite = unscale_grads(grads, loss_scale)
    # value=loss: transforms that use the objective (reduce_on_plateau, ...) get it, others don't.
    new_params, new_opt_state, grad_norm = apply_update(tx, params, opt_state, grads, max_grad_norm=max_grad_norm,
                                                        value=loss)
    if skip_non_finite and not needs_loss_scale:
        finite = window_finite(loss, grads, grad_norm, max_grad_norm)
    new = (new_params, new_opt_state, new_buffers, step + 1)
    if needs_loss_scale:
        new, loss_scale = keep_if_finite(finite, new, (params, opt_state, old_buffers, step), loss_scale)
    elif finite is not None:
        new = tree.where(finite, new[:3], (params, opt_state, old_buffers)) + (step + finite.to(step.dtype),)
    return (*new, loss_scale), grad_norm, finite


def _update_in_place(tx, params, opt_state, step, grads, loss, old_buffers, new_buffers, *, max_grad_norm,
                     skip_non_finite: bool):
    """The in-place update of a donated eager step (``leafwise_update``): params, optimizer state
    and step are written in place; ``(buffers to keep, grad_norm, finite)``. A plain ``adamw`` runs
    as torch's fused kernel (over per-name tensors or flat segments: a segment's parameters share
    their weight-decay mask), any other leafwise ``tx`` a group of parameters at a time."""
    grad_norm = tree.global_norm(grads)
    finite = window_finite(loss, grads, grad_norm, max_grad_norm) if skip_non_finite else None
    if hasattr(finite, "full_tensor"):  # sharded gradients: a DTensor; in-place ops on plain tensors need a plain one
        finite = finite.full_tensor()
    adamw = fused_adamw_of(tx)
    if adamw is not None and fused_adamw_applies(params, grads, opt_state):
        _fused_adamw_update(adamw, params, opt_state, grads, grad_norm, max_grad_norm, finite)
    else:
        apply_update_in_groups_(tx, params, opt_state, grads, max_grad_norm=max_grad_norm, value=loss,
                                finite=finite, grad_norm=grad_norm)
    step.add_(1 if finite is None else finite.to(step.dtype))
    if finite is not None:
        new_buffers = tree.where(finite, new_buffers, old_buffers)
    return new_buffers, grad_norm, finite


def window_finite(loss, grads, grad_norm, max_grad_norm) -> torch.Tensor:
    """A 0-d bool: the window's loss and every gradient are finite (``skip_non_finite``).

    With clipping, read from the global norm the clip computes anyway (a NaN or Inf gradient makes
    it non-finite), which spares a pass over the gradients. The one difference from checking each
    element: a norm beyond fp32's range (entries around 1e19) also counts as non-finite; clipping
    by that norm would have zeroed the step's gradients."""
    if max_grad_norm is not None:
        return torch.isfinite(loss) & torch.isfinite(grad_norm)
    return torch.isfinite(loss) & tree.all_finite(grads)


def _fused_adamw_update(adamw, params, opt_state, grads, grad_norm, max_grad_norm, finite) -> None:
    """The plain ``adamw`` chain's update as torch's fused kernel, in place (see
    :mod:`functrain.core.optim.fused_adamw`), after clipping to ``max_grad_norm`` by ``grad_norm``."""
    grads = _writable(grads)
    if max_grad_norm is not None:  # in place: a fresh tensor per gradient costs more than the kernel (CPU)
        foreach.mul_(tree.leaves(grads), clip_factor(grad_norm, max_grad_norm))
    fused_adamw_(adamw, params, grads, opt_state, finite=finite)


def _writable(grads):
    """``grads`` with each tensor dense and its own storage, so it can be scaled in place: autograd may
    hand out an expanded view, or one tensor for two parameters (``a + b``); those are copied."""
    seen = set()

    def own(g):
        ptr = g.untyped_storage().data_ptr()
        if g.is_contiguous() and ptr not in seen:
            seen.add(ptr)
            return g
        return g.clone(memory_format=torch.contiguous_format)

    return tree.map(own, grads)


def _update_metrics(opt_state, finite, loss_scale) -> dict:
    """``learning_rate`` (when the optimizer state records one), ``skipped`` and ``loss_scale``
    (when the step can skip), all 0-d tensors."""
    metrics = {}
    lr = find_learning_rate(opt_state)
    if lr is not None:  # a new tensor: a donated state's changes next step
        metrics["learning_rate"] = lr * _learning_rate_scale(opt_state)
    if loss_scale is not None:
        metrics["loss_scale"] = loss_scale.scale
    if finite is not None:
        metrics["skipped"] = ~finite
    return metrics


def _donated(outputs: tuple, inputs: tuple, donate: bool, module_buffers) -> tuple:
    """A core's outputs, written into its inputs' storages when a donating step's core returned
    new tensors (compiled cores do; eager ones wrote into the inputs already)."""
    params, buffers, opt_state, step, loss_scale, metrics = outputs
    old_params, old_buffers, old_opt_state, old_step, old_loss_scale = inputs
    if not donate or params is old_params:
        return outputs
    with torch.no_grad():
        tree.copy_((old_params, old_opt_state, old_step, old_loss_scale), (params, opt_state, step, loss_scale))
        old_module_buffers = module_buffers_of(old_buffers, module_buffers)
        tree.copy_(old_module_buffers, buffers)
    return old_params, old_module_buffers, old_opt_state, old_step, old_loss_scale, metrics


# -- the eval step -------------------------------------------------------------------------------


def make_eval_step(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    *,
    precision: str = "fp32",
    compile: bool = False,  # noqa: A002
    count_items: Callable[[Mapping], torch.Tensor] | None = None,
    return_outputs: bool = False,
    param_transform: Callable | None = None,
    required_keys=None,
    compile_kwargs: dict | None = None,
    deterministic: bool = False,
):
    """Build ``eval_step(state, batch) -> dict``: ``loss`` (mean over the batch's items),
    ``num_items`` and, with ``return_outputs``, ``outputs``.

    The model runs in eval mode under ``torch.no_grad``. With the default loss ``outputs`` is
    what HF's ``prediction_step`` calls logits: the model output entries other than ``loss`` and
    the config's ``keys_to_ignore_at_inference`` (a tensor if there is one, else a tuple; a tuple
    output's first entry is the loss when the batch has the model's labels; see
    :mod:`functrain.adapters.outputs`). With a custom ``loss_fn``, return
    ``(loss, {"outputs": ..., "labels": ...})`` to get outputs (and the labels to report).
    A batch without the model's labels (default loss) gives only ``outputs``.
    ``param_transform`` is applied to the params before binding them (as in make_train_step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    policy = get_policy(precision)
    user_loss = loss_fn is not None
    count_items = count_items or batching.make_count_items(model)
    required_keys = tuple(required_keys) if required_keys is not None else ()
    forward_keys = None if user_loss else batching.forward_argument_names(model)
    pin_loss_function(model)
    ignore = hf_outputs.ignore_keys_of(model)
    label_names = hf_outputs.find_labels(model)

    def default_eval_fn(m, batch):
        out = m(**batch, **hf_outputs.no_cache_kwargs(m, batch))
        has_labels = hf_outputs.labels_of(batch, label_names) is not None
        loss, outputs = hf_outputs.split_outputs(out, has_labels, ignore)
        return loss, {"outputs": outputs}

    loss_module = LossModule(model, loss_fn or default_eval_fn)
    module_buffers = buffer_names(model)

    param_transform = param_transform or (lambda params: params)

    def eval_core(params, buffers, batch):
        # Copies of the module's buffers: even a forward that writes them leaves the state as it was.
        buffers = {**buffers, **tree.clone(module_buffers_of(buffers, module_buffers))}
        with torch.no_grad(), autocast(policy, device_type(params)):
            out = torch.func.functional_call(loss_module, (prefixed(param_transform(params)), prefixed(buffers)),
                                             (batch,), tie_weights=True)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        result = {}
        if loss is not None:
            result["loss"] = loss.float()
            result["num_items"] = count_items(batch)
        for k, v in aux.items():
            if k not in ("outputs", "labels"):
                result[k] = torch.as_tensor(v).float()
        if return_outputs:
            result["outputs"] = aux.get("outputs")
            if aux.get("labels") is not None:  # labels as the loss_fn saw them (label_ids)
                result["labels"] = aux["labels"]
        return result

    core = _maybe_compile(eval_core, compile, compile_kwargs, deterministic)

    def eval_step(state: TrainState, batch: Mapping):
        batching.validate(batch, accumulate=1, required_keys=required_keys, model=model, forward_keys=forward_keys)
        with rnglib.seeded(state.rng), _module_mode(model, training=False):
            return core(state.params, state.buffers, dict(batch))

    eval_step.core = core
    eval_step.pure_core = eval_core  # uncompiled: for transforms (vmap)
    return eval_step


# -- helpers -------------------------------------------------------------------------------------


def _learning_rate_scale(opt_state):
    """The product of the ``scale`` of states that scale the learning rate (``reduce_on_plateau``)."""
    if getattr(type(opt_state), "scales_learning_rate", False):
        return opt_state.scale
    if isinstance(opt_state, Mapping):
        opt_state = tuple(opt_state.values())
    factor = 1.0
    if isinstance(opt_state, (tuple, list)):
        for child in opt_state:
            factor = factor * _learning_rate_scale(child)
    return factor


def find_learning_rate(opt_state) -> torch.Tensor | None:
    """The learning rate recorded in an optimizer state, or ``None``.

    Looks for the first NamedTuple with a tensor ``learning_rate`` field
    (``ScaleByLearningRateState``) or a ``hyperparams`` dict with a ``learning_rate`` entry
    (``inject_hyperparams``), searching tuples, lists and dicts depth first.
    """
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        lr = getattr(opt_state, "learning_rate", None)
        if isinstance(lr, torch.Tensor):
            return lr
        hp = getattr(opt_state, "hyperparams", None)
        if isinstance(hp, Mapping) and isinstance(hp.get("learning_rate"), torch.Tensor):
            return hp["learning_rate"]
    if isinstance(opt_state, (tuple, list)):
        children = opt_state
    elif isinstance(opt_state, Mapping):
        children = opt_state.values()
    else:
        return None
    for child in children:
        found = find_learning_rate(child)
        if found is not None:
            return found
    return None


def _maybe_compile(fn, compile_: bool, compile_kwargs: dict | None, deterministic: bool = False):
    if not compile_:
        if not deterministic:
            return fn

        @functools.wraps(fn)
        def run_eager(*args):
            with _deterministic_algorithms():
                return fn(*args)

        return run_eager
    kwargs = {"fullgraph": True, **(compile_kwargs or {})}
    if deterministic and kwargs.get("backend", "inductor") == "inductor" and "mode" not in kwargs:
        kwargs["options"] = {"deterministic": True, **kwargs.get("options", {})}
    compiled = torch.compile(fn, **kwargs)

    @functools.wraps(fn)
    def run(*args):
        # Without this flag dynamo graph-breaks on torch.autograd.grad (torch 2.13).
        with torch._dynamo.config.patch(trace_autograd_ops=True), \
                (_deterministic_algorithms() if deterministic else contextlib.nullcontext()):
            return compiled(*args)

    run.compiled = compiled
    return run


@contextlib.contextmanager
def _deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` while the step runs (a process-wide flag, put back after).

    Inductor reads the flag when it compiles: without it, accumulating scatters (``index_put_`` /
    ``scatter_add``: the backward of an embedding lookup) become C++ loops split over the threads
    that ``atomic_add`` into the same rows, so the order of the float additions, hence the last
    bits, changes from run to run. With it they fall back to aten's kernels, which are
    deterministic (CPU: serial accumulation; CUDA: sorted indices), and eager CUDA kernels
    (cuBLAS, scatter) pick their deterministic variants too.
    """
    if torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def _module_mode(model: nn.Module, training: bool):
    """Set train/eval mode for the step and restore every submodule's mode afterwards.

    Only the modules whose mode differs are flipped (``model.train()`` walks and sets every module,
    hundreds of Python calls per step for a deep model); a module class with its own ``train()``
    gets the full ``model.train(training)`` call so its override runs."""
    modules = list(model.modules())
    flipped = [m for m in modules if m.training != training]
    if flipped and any(type(m).train is not nn.Module.train for m in modules):
        modes = [(m, m.training) for m in modules]
        model.train(training)
    else:
        modes = [(m, not training) for m in flipped]
        for m in flipped:
            m.training = training
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
