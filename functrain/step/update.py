"""The update and the fp16 loss-scale bookkeeping: the building blocks after the gradients.

    params, opt_state, grad_norm = apply_update(tx, params, opt_state, grads, max_grad_norm=1.0)

and, with a dynamic loss scale (fp16), around it::

    grads, finite = unscale_grads(grads, loss_scale)           # divide by the scale; all finite?
    ...apply_update...
    (params, opt_state, step), loss_scale = keep_if_finite(finite, new, old, loss_scale)

All pure and traceable (no host sync): a non-finite step is skipped with ``torch.where``, not an ``if``.
:meth:`functrain.TrainState.apply_gradients` is the short form of ``apply_update`` on a state.
"""

from __future__ import annotations

from functrain.core import tree
from functrain.core.optim.base import apply_updates, update_with_extra_args
from functrain.core.optim.transforms import clip_factor
from functrain.core.precision import dynamic_scale_update, unscale


def apply_update(tx, params, opt_state, grads, *, max_grad_norm: float | None = None, value=None):
    """``(new_params, new_opt_state, grad_norm)``: the global norm of ``grads`` (before clipping),
    clipping to ``max_grad_norm`` (HF's rule; ``None``: none here), then ``tx``'s update.
    ``value``: the loss, for transforms that take it (``reduce_on_plateau``; others ignore it)."""
    grad_norm = tree.global_norm(grads)
    if max_grad_norm is not None:
        grads = tree.scale(grads, clip_factor(grad_norm, max_grad_norm))
    extra = {} if value is None else {"value": value}
    updates, new_opt_state = update_with_extra_args(tx, grads, opt_state, params, **extra)
    return apply_updates(params, updates), new_opt_state, grad_norm


def unscale_grads(grads, loss_scale):
    """``(grads / scale, finite)``: gradients of a scaled loss back to true size, and a 0-d bool
    saying every element is finite (the step is kept only then)."""
    grads = unscale(grads, loss_scale)
    return grads, tree.all_finite(grads)


def keep_if_finite(finite, new, old, loss_scale):
    """``(new if finite else old, next loss scale)``: a non-finite step changes nothing but the
    loss scale (backed off; grown after enough finite steps), as ``torch.amp.GradScaler``."""
    return tree.where(finite, new, old), dynamic_scale_update(loss_scale, finite)
