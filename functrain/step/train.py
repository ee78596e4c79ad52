"""The pure training step: ``train_step(state, batch) -> (new_state, metrics)``.

Read :func:`make_train_step` top to bottom: ``_train_core`` is every operation that touches the
state, in order (split the window, count items, per-microbatch gradients, reduce, unscale,
norm, clip, optimizer update, loss-scale bookkeeping, donation copy). The returned
``train_step`` wraps it with what cannot be traced: batch validation (host metadata only), the
explicit RNG key and the module's train/eval mode. See ``docs/step.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from functrain.adapters import outputs as hf_outputs
from functrain.step import batch as batching
from functrain.step.grouped_update import update_in_groups_
from functrain.core import rng as rnglib
from functrain.core import tree
from functrain.core.optim.base import apply_updates
from functrain.core.optim.transforms import clip_factor
from functrain.core.precision import DynamicScale, dynamic_scale_init, dynamic_scale_update, get_policy, unscale
from functrain.core.state import TrainState

LossFn = Callable[[nn.Module, Mapping], Any]  # -> loss | (loss, aux dict)


# -- the loss ------------------------------------------------------------------------------------


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


def _split_loss(out) -> tuple[torch.Tensor, dict]:
    loss, aux = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"loss_fn must return a 0-d tensor (or (loss, aux_dict)), got {loss!r:.80}")
    if not isinstance(aux, Mapping):
        raise TypeError(f"loss_fn's aux must be a dict of tensors, got {type(aux).__name__}")
    return loss.float(), dict(aux)


class _LossModule(nn.Module):
    """Holds the user's model so ``functional_call`` can bind state tensors to it (``model.*``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _prefixed(d: Mapping) -> dict:
    return {"model." + k: v for k, v in d.items()}


def _autocast(policy, device_type: str):
    if policy.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=policy.compute_dtype)


# -- hooks a distributed driver replaces ---------------------------------------------------------


def _identity(x):
    return x


def _zero_unless_(grads: dict, has_items: torch.Tensor) -> dict:
    """``torch.where(has_items, g, 0)`` for each gradient, in place where the gradient owns its
    memory (autograd's fresh results; an expanded view gets a new tensor). No host sync."""
    no_items = ~has_items
    return {k: g.masked_fill_(no_items, 0.0) if g.is_contiguous() else torch.where(has_items, g, 0.0)
            for k, g in grads.items()}


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
    leafwise_update: bool = False,
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
        compile: compile the whole step with ``torch.compile(fullgraph=True)``.
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
        param_transform: ``{name: param} -> {name: tensor}`` applied to the (differentiable)
            params right before they are bound to the model (default identity). Sharded mode
            (:func:`functrain.distributed.gather_params`) all-gathers ``DTensor`` shards here, so
            gradients come back sharded; the optimizer update still sees the state's own tensors.
        required_keys: batch keys the loss needs (checked before the step runs). Default:
            ``("labels",)`` with the default loss, none with a custom ``loss_fn``.
        compile_kwargs: extra keyword arguments for ``torch.compile``.
        differentiate: ``"autograd"`` (default: ``torch.autograd.grad``, works with activation
            checkpointing and DTensor params) or ``"func"`` (``torch.func.grad``: composes with
            ``torch.func.vmap``, as the population step in :mod:`functrain.population` needs; no
            activation checkpointing).
        rng_stream: folded into the state's key before seeding (0: the key as is). Data-parallel
            ranks pass their rank so each draws its own dropout masks from the same state.
        leafwise_update: declare that ``tx`` updates each parameter from its own gradient, state
            and value alone (Adam(W), SGD, Lion, RMSprop, Adagrad; not a global-norm clip or
            ``apply_if_finite`` inside ``tx``). With ``donate=True`` and ``compile=False`` the
            update then runs a group of parameters at a time, in place, so eager training holds
            one copy of params and optimizer state plus one group's temporaries (same numbers;
            see :mod:`functrain.step.grouped_update`). Ignored otherwise (and with fp16).

    Metrics (0-d tensors, never read on the host by the step): ``loss`` (mean over the
    supervised items of the whole window), ``grad_norm`` (global norm before clipping),
    ``learning_rate`` (when the optimizer state records one), ``num_items``; with fp16
    ``loss_scale`` and ``skipped``; plus the loss_fn's aux entries (item-weighted means).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(accumulate, int) and accumulate >= 1):
        raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
    policy = get_policy(precision)
    user_loss = loss_fn is not None
    loss_fn = loss_fn or default_loss_fn
    count_items = count_items or batching.make_count_items(model)
    grad_reduce = grad_reduce or _identity
    count_reduce = count_reduce or _identity
    transform_params = param_transform is not None
    param_transform = param_transform or _identity
    required_keys = tuple(required_keys) if required_keys is not None else (() if user_loss else ("labels",))
    forward_keys = None if user_loss else batching.forward_argument_names(model)
    if differentiate not in ("autograd", "func"):
        raise ValueError(f"differentiate must be 'autograd' or 'func', got {differentiate!r}")
    _check_checkpointing(model)
    if differentiate == "func" and transform_params:
        raise ValueError("differentiate='func' (vmapped populations) does not support param_transform "
                         "(sharded DTensor params need torch.autograd.grad)")
    if differentiate == "func" and _uses_checkpointing(model):
        raise ValueError("differentiate='func' (torch.func.grad, used by vmapped populations) cannot run activation "
                         "checkpointing (it forbids saved-tensor hooks); disable checkpointing for this model")
    if compile and accumulate > 1 and _uses_checkpointing(model):
        # torch 2.13 AOTAutograd rematerializes only one backward region per compiled graph.
        raise ValueError("compile=True with accumulate > 1 cannot use activation checkpointing in torch "
                         f"{torch.__version__} (one recompute region per graph); use accumulate=1 with a "
                         "bigger batch, compile=False, or disable checkpointing")
    _pin_hf_loss_function(model)
    loss_module = _LossModule(model, loss_fn)
    grouped = leafwise_update and donate and not compile and not policy.needs_loss_scale

    def micro_grads(params, buffers, microbatch, weight, scale, has_items):
        """Gradients of this microbatch's share of the window loss (times the fp16 loss scale).

        weight = count_k / total_count, so the shares sum to the mean over the whole window.
        Uses ``torch.autograd.grad`` on detached copies of the params (not ``torch.func.grad``,
        which cannot run activation checkpointing: it forbids saved-tensor hooks).
        """
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            bound = param_transform(leaves)
            if transform_params:
                # The transform's backward may reduce gradients across ranks (sharded mode): a
                # microbatch without items (NaN loss) must contribute zeros BEFORE that, or its NaN
                # would reach every rank. where() passes the value through and masks the gradient.
                bound = {k: torch.where(has_items, v, v.detach()) for k, v in bound.items()}
            with _autocast(policy, _device_type(params)):
                out = torch.func.functional_call(loss_module, (_prefixed(bound), _prefixed(buffers)),
                                                 (microbatch,), tie_weights=True)
            loss, aux = _split_loss(out)
            share = loss * weight
            if scale is not None:
                share = share * scale
            grads = torch.autograd.grad(share, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
        return grads, loss.detach(), {k: torch.as_tensor(v).detach().float() for k, v in aux.items()}

    def micro_grads_func(params, buffers, microbatch, weight, scale, has_items):
        """Same contract as ``micro_grads`` with ``torch.func.grad`` (pure: composes with vmap).

        ``has_items`` is not needed here: without a param_transform, window_grads masks it.
        """

        def share_of(p):
            with _autocast(policy, _device_type(p)):
                out = torch.func.functional_call(loss_module, (_prefixed(p), _prefixed(buffers)), (microbatch,),
                                                 tie_weights=True)
            loss, aux = _split_loss(out)
            share = loss * weight
            if scale is not None:
                share = share * scale
            return share, (loss, {k: torch.as_tensor(v).float() for k, v in aux.items()})

        # torch.func.grad returns zeros for parameters the loss does not use.
        grads, (loss, aux) = torch.func.grad(share_of, has_aux=True)(params)
        return grads, loss, aux

    if differentiate == "func":
        micro_grads = micro_grads_func  # noqa: F811 - chosen once, at build time

    def window_grads(params, buffers, batch, scale):
        """Summed gradients of the window mean loss, one microbatch at a time."""
        microbatches = batching.split(batch, accumulate)
        counts = [count_items(mb) for mb in microbatches]
        # (a) the single place the window's item count is formed (and reduced across ranks).
        total = count_reduce(torch.stack(counts).sum())
        denom = total.float().clamp_min(1.0)
        grads, loss, aux = None, torch.zeros((), device=denom.device), {}
        for mb, count in zip(microbatches, counts):
            weight = count.float() / denom
            # A microbatch with no supervised items contributes nothing (its mean is 0/0 = NaN).
            has_items = count > 0
            g, mb_loss, mb_aux = micro_grads(params, buffers, mb, weight, scale, has_items)
            if not transform_params and grouped:  # donated eager: no second copy of the gradients
                g = _zero_unless_(g, has_items)
            elif not transform_params:  # (with a transform, g may already hold other ranks' sums)
                g = tree.map(lambda x: torch.where(has_items, x, 0.0), g)
            grads = g if grads is None else tree.add(grads, g)
            loss = loss + torch.where(has_items, mb_loss * weight, 0.0)
            for k, v in mb_aux.items():
                aux[k] = aux.get(k, 0.0) + torch.where(has_items, v * weight, 0.0)
        # (b) the single place gradients are reduced across ranks.
        return grad_reduce(grads), loss, total, aux

    def train_core(params, buffers, opt_state, step, loss_scale, batch):
        scale = loss_scale.scale if policy.needs_loss_scale else None
        grads, loss, total, aux = window_grads(params, buffers, batch, scale)
        metrics = {"loss": loss, "num_items": total}
        if policy.needs_loss_scale:
            grads = unscale(grads, loss_scale)
            finite = tree.all_finite(grads)
        grad_norm = tree.global_norm(grads)
        metrics["grad_norm"] = grad_norm
        if grouped:
            clip = clip_factor(grad_norm, max_grad_norm) if max_grad_norm is not None else None
            update_in_groups_(tx, params, grads, opt_state, clip)  # params and opt_state in place
            step.add_(1)
            lr = find_learning_rate(opt_state)
            if lr is not None:
                metrics["learning_rate"] = lr.clone()  # the state's tensor changes next step
            metrics.update(aux)
            return params, opt_state, step, loss_scale, metrics
        if max_grad_norm is not None:
            grads = tree.scale(grads, clip_factor(grad_norm, max_grad_norm))
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = apply_updates(params, updates)
        if policy.needs_loss_scale:
            # A non-finite step changes nothing but the loss scale: params, optimizer state
            # (hence the schedule position) and the step counter keep their values.
            new_params = tree.where(finite, new_params, params)
            new_opt_state = tree.where(finite, new_opt_state, opt_state)
            new_step = step + finite.to(step.dtype)
            new_loss_scale = dynamic_scale_update(loss_scale, finite)
            metrics["loss_scale"] = new_loss_scale.scale
            metrics["skipped"] = ~finite
        else:
            new_step = step + 1
            new_loss_scale = loss_scale
        lr = find_learning_rate(new_opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        metrics.update(aux)
        if donate:
            # Write the results into the input storages; inside torch.compile this fuses with the
            # computation, so no second copy of params/optimizer state is ever alive.
            tree.copy_((params, opt_state, step, loss_scale), (new_params, new_opt_state, new_step, new_loss_scale))
            return params, opt_state, step, loss_scale, metrics
        return new_params, new_opt_state, new_step, new_loss_scale, metrics

    core = _maybe_compile(train_core, compile, compile_kwargs)

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
            params, opt_state, step, loss_scale, metrics = core(
                state.params, state.buffers, state.opt_state, state.step, loss_scale, dict(batch))
        new_state = state.replace(params=params, opt_state=opt_state, step=step, loss_scale=loss_scale,
                                  rng=rnglib.next_key(state.rng))
        if donate:
            state.mark_consumed("a train_step built with donate=True")
        return new_state, metrics

    train_step.core = core  # for tests and tools (e.g. torch._dynamo.explain)
    train_step.pure_core = train_core  # uncompiled, no RNG/mode handling: for transforms (vmap)
    return train_step


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
    _pin_hf_loss_function(model)
    ignore = hf_outputs.ignore_keys_of(model)
    label_names = hf_outputs.find_labels(model)

    def default_eval_fn(m, batch):
        out = m(**batch, **hf_outputs.no_cache_kwargs(m, batch))
        has_labels = hf_outputs.labels_of(batch, label_names) is not None
        loss, outputs = hf_outputs.split_outputs(out, has_labels, ignore)
        return loss, {"outputs": outputs}

    loss_module = _LossModule(model, loss_fn or default_eval_fn)

    param_transform = param_transform or _identity

    def eval_core(params, buffers, batch):
        with torch.no_grad(), _autocast(policy, _device_type(params)):
            out = torch.func.functional_call(loss_module, (_prefixed(param_transform(params)), _prefixed(buffers)),
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

    core = _maybe_compile(eval_core, compile, compile_kwargs)

    def eval_step(state: TrainState, batch: Mapping):
        batching.validate(batch, accumulate=1, required_keys=required_keys, model=model, forward_keys=forward_keys)
        with rnglib.seeded(state.rng), _module_mode(model, training=False):
            return core(state.params, state.buffers, dict(batch))

    eval_step.core = core
    eval_step.pure_core = eval_core  # uncompiled: for transforms (vmap)
    return eval_step


# -- helpers -------------------------------------------------------------------------------------


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


def _device_type(params: Mapping) -> str:
    return next(iter(params.values())).device.type


def _maybe_compile(fn, compile_: bool, compile_kwargs: dict | None):
    if not compile_:
        return fn
    compiled = torch.compile(fn, **{"fullgraph": True, **(compile_kwargs or {})})

    @functools.wraps(fn)
    def run(*args):
        # Without this flag dynamo graph-breaks on torch.autograd.grad (torch 2.13).
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)

    run.compiled = compiled
    return run


@contextlib.contextmanager
def _module_mode(model: nn.Module, training: bool):
    """Set train/eval mode for the step and restore every submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _pin_hf_loss_function(model: nn.Module) -> None:
    """Resolve a transformers model's ``loss_function`` once, outside the compiled step.

    For models whose ``loss_type`` is not in ``LOSS_MAPPING`` (``GPT2LMHeadModel`` among them)
    the ``loss_function`` property logs a warning and falls back to ``ForCausalLMLoss`` on every
    forward; a logger call inside ``torch.compile(fullgraph=True)`` is a graph break. Setting the
    attribute to the function the property would return keeps the behaviour and the graph whole.
    """
    if "_loss_function" in vars(model) or not isinstance(type(model).__dict__.get("loss_function")
                                                         or getattr(type(model), "loss_function", None), property):
        return
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except Exception:
        return
    if getattr(model, "loss_type", None) not in LOSS_MAPPING:
        model.loss_function = model.loss_function


def _uses_checkpointing(model: nn.Module) -> bool:
    from functrain.step.recompute import is_checkpointed

    return any(getattr(m, "gradient_checkpointing", False) is True or is_checkpointed(m) for m in model.modules())


def _check_checkpointing(model: nn.Module) -> None:
    """Make a transformers model's activation checkpointing usable under ``torch.func.grad``.

    ``gradient_checkpointing_enable()`` also registers forward hooks that call
    ``requires_grad_()`` on the embeddings' output, so that *reentrant* checkpointing sees an
    input requiring grad. ``torch.func`` forbids ``requires_grad_`` inside a transform, and the
    step differentiates with respect to the params explicitly, so the hooks are not needed:
    they are removed (``model.disable_input_require_grads()``). Reentrant checkpointing itself
    cannot be differentiated with ``torch.autograd.grad`` and is rejected with a clear error.
    """
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    for m in model.modules():
        if not getattr(m, "gradient_checkpointing", False):
            continue
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(fn, "keywords", {}).get("use_reentrant", False):
            raise ValueError(
                f"{type(m).__name__} uses reentrant gradient checkpointing, which torch.autograd.grad cannot "
                "differentiate (it needs .backward()); enable it with model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}) (the default in transformers 5)")
