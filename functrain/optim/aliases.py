"""Ready-made optimizers (optax names and argument names), each a ``chain`` of transforms.

``learning_rate`` may be a number, a 0-d tensor or a schedule from :mod:`functrain.schedules`.
``mask`` (where offered) selects the parameters that get weight decay: a pytree of bools shaped
like the params, or a function ``params -> that pytree`` (see ``default_weight_decay_mask``).
"""

from __future__ import annotations

from .base import GradientTransformation, chain, identity
from . import transforms as T


def _decay(weight_decay, mask) -> GradientTransformation:
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return identity()
    decay = T.add_decayed_weights(weight_decay)
    if mask is None:
        return decay
    from .combine import masked  # local import: combine builds on this module's transforms

    return masked(decay, mask)


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, *, mask=None,
          amsgrad: bool = False) -> GradientTransformation:
    """AdamW (decoupled weight decay), matching ``torch.optim.AdamW``."""
    return chain(
        T.scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        _decay(weight_decay, mask),
        T.scale_by_learning_rate(learning_rate),
    )


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
         amsgrad: bool = False) -> GradientTransformation:
    """Adam, matching ``torch.optim.Adam`` (its ``weight_decay`` is L2 added to the gradient)."""
    return chain(
        _decay(weight_decay, None),
        T.scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        T.scale_by_learning_rate(learning_rate),
    )


def sgd(learning_rate, momentum=0.0, *, nesterov: bool = False, dampening=0.0,
        weight_decay=0.0) -> GradientTransformation:
    """SGD with optional momentum, matching ``torch.optim.SGD`` (L2 weight decay on the gradient)."""
    has_momentum = not (isinstance(momentum, (int, float)) and momentum == 0)
    if nesterov and not has_momentum:
        raise ValueError("nesterov=True needs momentum > 0")
    return chain(
        _decay(weight_decay, None),
        T.trace(momentum, nesterov=nesterov, dampening=dampening) if has_momentum else identity(),
        T.scale_by_learning_rate(learning_rate),
    )
