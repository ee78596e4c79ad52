"""Wrappers that change when or on what an optimizer runs: gradient accumulation for ported optax
code (``MultiSteps``) and an exponential moving average of the parameters.

Both are branch-free (the inner update always runs and ``torch.where`` picks the result), so a
compiled step has one graph and never syncs the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.core import foreach, tree
from functrain.core.optim.base import (
    require_params,
    GradientTransformationExtraArgs,
    apply_updates,
    as_hyperparam,
    counter_like,
    update_with_extra_args,
)


class MultiStepsState(NamedTuple):
    mini_step: torch.Tensor  # microbatches accumulated since the last inner update, 0-d int64
    gradient_step: torch.Tensor  # inner updates done, 0-d int64
    inner_opt_state: Any
    acc_grads: tree.PyTree  # mean (or sum) of the gradients since the last inner update


class MultiSteps:
    """Accumulate gradients over ``every_k_schedule`` calls, then apply ``opt`` once (optax).

    Between inner updates the updates are zeros. With ``use_grad_mean`` the inner optimizer sees
    the mean of the ``k`` gradients, else their sum. ``every_k_schedule`` must be an int here.
    For new code prefer the train step's own ``accumulate=`` (it splits one batch and does one
    update); this is for porting optax code that calls ``update`` once per microbatch.
    """

    def __init__(self, opt, every_k_schedule: int, use_grad_mean: bool = True):
        if isinstance(every_k_schedule, bool) or not isinstance(every_k_schedule, int) or every_k_schedule < 1:
            raise ValueError(f"MultiSteps: every_k_schedule must be an int >= 1 (schedules are not supported), "
                             f"got {every_k_schedule!r}")
        self.opt, self.k, self.use_grad_mean = opt, every_k_schedule, use_grad_mean

    def init(self, params) -> MultiStepsState:
        zero = counter_like(params)
        return MultiStepsState(zero, zero.clone(), self.opt.init(params), tree.zeros_like(params))

    def update(self, updates, state: MultiStepsState, params=None, **extra_args):
        g = tree.leaves(updates)
        acc = tree.leaves(state.acc_grads)
        if self.use_grad_mean:  # running mean: acc + (g - acc) / (n + 1)
            weight = 1.0 / (state.mini_step + 1).to(torch.float32)
            new_acc = foreach.add(acc, foreach.mul(foreach.sub(g, acc), weight)) if g else []
        else:
            new_acc = foreach.add(acc, g) if g else []
        new_acc = tree.unflatten(tree.structure(updates), new_acc)
        emit = state.mini_step == self.k - 1
        inner_updates, inner_state = update_with_extra_args(self.opt, new_acc, state.inner_opt_state, params,
                                                            **extra_args)
        out = tree.where(emit, inner_updates, tree.zeros_like(inner_updates))
        new_state = MultiStepsState(
            torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1),
            torch.where(emit, state.gradient_step + 1, state.gradient_step),
            tree.where(emit, inner_state, state.inner_opt_state),
            tree.where(emit, tree.zeros_like(new_acc), new_acc),
        )
        return out, new_state

    def has_updated(self, state: MultiStepsState) -> torch.Tensor:
        """Whether the last ``update`` applied the inner optimizer (a 0-d bool tensor)."""
        return (state.mini_step == 0) & (state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformationExtraArgs:
        return GradientTransformationExtraArgs(self.init, self.update)


class ParamEmaState(NamedTuple):
    count: torch.Tensor  # updates averaged in, 0-d int64
    ema: tree.PyTree  # the moving average of the parameters after each update
    inner_state: Any


def _inner_update(name: str, inner, updates, state, params, extra_args):
    """Run the wrapped optimizer: its updates, its new state and the leaves of the params they give."""
    require_params(params, name)
    updates, inner_state = update_with_extra_args(inner, updates, state.inner_state, params, **extra_args)
    return updates, inner_state, tree.leaves(apply_updates(params, updates))


def with_param_ema(inner, decay) -> GradientTransformationExtraArgs:
    """Run ``inner`` and keep an exponential moving average of the updated parameters in the state.

    ``ema = params`` after the first update, then ``ema = decay * ema + (1 - decay) * params``:
    the rule of ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``.
    Read the average with :func:`param_ema` (e.g. to evaluate or save EMA weights). It lives in
    the optimizer state rather than ``TrainState.extras`` so the compiled step updates it with
    the parameters and checkpoints carry it.
    """
    decay = as_hyperparam(decay, "decay")

    def init(params):
        return ParamEmaState(counter_like(params), tree.zeros_like(params), inner.init(params))

    def update(updates, state, params=None, **extra_args):
        updates, inner_state, new_params = _inner_update("with_param_ema", inner, updates, state, params, extra_args)
        ema = tree.leaves(state.ema)
        keep = torch.where(state.count == 0, 0.0, decay).to(torch.float32)
        new_ema = foreach.lerp(ema, new_params, 1 - keep) if ema else []
        return updates, ParamEmaState(state.count + 1, tree.unflatten(tree.structure(params), new_ema), inner_state)

    return GradientTransformationExtraArgs(init, update)


def param_ema(opt_state) -> tree.PyTree:
    """The parameter average kept by :func:`with_param_ema` in ``opt_state`` (searched depth first)."""
    if isinstance(opt_state, ParamEmaState):
        return opt_state.ema
    children = opt_state.values() if isinstance(opt_state, dict) else opt_state if isinstance(opt_state, (tuple, list)) else ()
    for child in children:
        try:
            return param_ema(child)
        except LookupError:
            continue
    raise LookupError("no with_param_ema state in this optimizer state")


class LookaheadState(NamedTuple):
    count: torch.Tensor  # fast updates done, 0-d int64
    slow: tree.PyTree  # the slow weights
    inner_state: Any


def lookahead(fast_optimizer, sync_period: int = 6, slow_step_size=0.5) -> GradientTransformationExtraArgs:
    """Lookahead (Zhang et al. 2019): every ``sync_period`` fast updates, move the slow weights
    ``slow_step_size`` of the way to the fast ones and restart the fast weights from them.

    optax's ``lookahead`` carries both weight sets in the params (``LookaheadParams``); here the
    params stay the model's (fast) weights and the slow weights live in the state, so the train
    step and checkpoints need nothing new. The numbers are the same (optax's ``reset_state=False``).
    """
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"lookahead: sync_period must be an int >= 1, got {sync_period!r}")
    slow_step_size = as_hyperparam(slow_step_size, "slow_step_size")

    def init(params):
        return LookaheadState(counter_like(params), tree.clone(params), fast_optimizer.init(params))

    def update(updates, state, params=None, **extra_args):
        updates, inner_state, fast = _inner_update("lookahead", fast_optimizer, updates, state, params, extra_args)
        slow = tree.leaves(state.slow)
        count = state.count + 1
        sync = (count % sync_period) == 0
        if not fast:
            return updates, LookaheadState(count, state.slow, inner_state)
        moved = foreach.lerp(slow, fast, slow_step_size)
        new_slow = [torch.where(sync, m, s) for m, s in zip(moved, slow)]
        new_params = [torch.where(sync, m, f) for m, f in zip(moved, fast)]
        out = foreach.sub(new_params, tree.leaves(params))
        treedef = tree.structure(params)
        return tree.unflatten(treedef, out), LookaheadState(count, tree.unflatten(treedef, new_slow), inner_state)

    return GradientTransformationExtraArgs(init, update)
