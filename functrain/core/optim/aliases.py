"""Ready-made optimizers (optax names and argument names), each a ``chain`` of transforms.

``learning_rate`` may be a number, a 0-d tensor or a schedule from :mod:`functrain.schedules`.
``mask`` (where offered) selects the parameters that get weight decay: a pytree of bools shaped
like the params, or a function ``params -> that pytree`` (see ``default_weight_decay_mask``).
"""

from __future__ import annotations

import torch

from .base import GradientTransformation, as_hyperparam, chain, identity
from . import adam_family as F
from . import muon as M
from . import transforms as T
from . import trust_ratio as R
from .fused_adamw import declare_fused_adamw


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
    """AdamW (decoupled weight decay), matching ``torch.optim.AdamW``.

    A donated eager step may run it in place as torch's fused AdamW kernel (the same update; see
    :mod:`functrain.core.optim.fused_adamw`)."""
    lr = T.scale_by_learning_rate(learning_rate)
    tx = chain(T.scale_by_adam(b1, b2, eps, amsgrad=amsgrad), _decay(weight_decay, mask), lr)
    return declare_fused_adamw(tx, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask, amsgrad=amsgrad,
                               learning_rate=lr)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
         amsgrad: bool = False) -> GradientTransformation:
    """Adam, matching ``torch.optim.Adam`` (its ``weight_decay`` is L2 added to the gradient)."""
    return chain(
        _decay(weight_decay, None),
        T.scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        T.scale_by_learning_rate(learning_rate),
    )


def _has_momentum(momentum) -> bool:
    return momentum is not None and not (isinstance(momentum, (int, float)) and momentum == 0)


def sgd(learning_rate, momentum=None, nesterov: bool = False, *, dampening=0.0,
        weight_decay=0.0) -> GradientTransformation:
    """SGD with optional momentum (optax defaults: ``momentum=None``, no momentum state).

    Matches ``torch.optim.SGD`` with the same arguments (``weight_decay`` is L2 added to the
    gradient; ``dampening`` is torch's, optax has none).
    """
    if nesterov and not _has_momentum(momentum):
        raise ValueError("nesterov=True needs momentum > 0")
    return chain(
        _decay(weight_decay, None),
        T.trace(momentum, nesterov=nesterov, dampening=dampening) if _has_momentum(momentum) else identity(),
        T.scale_by_learning_rate(learning_rate),
    )


def rmsprop(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt: bool = True, *,
            centered: bool = False, momentum=None, nesterov: bool = False, weight_decay=0.0) -> GradientTransformation:
    """RMSprop with optax's defaults (``decay=0.9``, ``eps`` inside the square root, no momentum).

    ``torch.optim.RMSprop`` is ``decay=0.99, eps_in_sqrt=False`` (``decay`` is its ``alpha``); the
    Trainer's ``optim="rmsprop"`` builds exactly that. ``weight_decay`` is L2 added to the
    gradient; ``momentum`` accumulates the preconditioned gradient before the learning rate
    (``buf = momentum * buf + g / denom``), as torch does (optax applies it after the learning rate;
    the two agree unless the learning rate changes).
    """
    if nesterov and not _has_momentum(momentum):
        raise ValueError("nesterov=True needs momentum > 0")
    return chain(
        _decay(weight_decay, None),
        T.scale_by_rms(decay, eps, centered=centered, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt),
        T.trace(momentum, nesterov=nesterov) if _has_momentum(momentum) else identity(),
        T.scale_by_learning_rate(learning_rate),
    )


def adagrad(learning_rate, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10) -> GradientTransformation:
    """Adagrad matching ``torch.optim.Adagrad`` (L2 ``weight_decay``; the step size at update
    ``t`` (0-based) is ``learning_rate / (1 + t * lr_decay)``)."""
    lr_decay = as_hyperparam(lr_decay, "lr_decay")
    lr = as_hyperparam(learning_rate, "learning_rate", allow_schedule=True)
    if not (isinstance(lr_decay, (int, float)) and lr_decay == 0):
        base = lr

        def lr(count):  # torch: clr = lr / (1 + (step - 1) * lr_decay), step counted from 1
            value = base(count) if callable(base) and not isinstance(base, torch.Tensor) else base
            return value / (1 + count.to(torch.float32) * lr_decay)

    return chain(
        _decay(weight_decay, None),
        T.scale_by_rss(initial_accumulator_value, eps),
        T.scale_by_learning_rate(lr),
    )


def lion(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, *, mask=None) -> GradientTransformation:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), optax defaults.

    ``p -= lr * (sign(b1 * m + (1 - b1) * g) + weight_decay * p)``; ``m = b2 * m + (1 - b2) * g``.
    """
    return chain(
        T.scale_by_lion(b1, b2),
        _decay(weight_decay, mask),
        T.scale_by_learning_rate(learning_rate),
    )


def adafactor(learning_rate=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
              weight_decay=0.0, scale_parameter: bool = True, relative_step: bool = True,
              warmup_init: bool = False) -> GradientTransformation:
    """Adafactor matching ``transformers.optimization.Adafactor`` (same arguments and defaults).

    With an external learning rate (a number, tensor or schedule) pass ``relative_step=False``,
    usually with ``scale_parameter=False``, as transformers recommends.
    """
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise ValueError(f"adafactor: eps must be a pair (eps_square, eps_scale), got {eps!r}")
    return chain(
        T.scale_by_factored_rms(decay_rate, eps[0], clip_threshold),
        T.scale_by_adafactor_step(learning_rate, eps=eps[1], beta1=beta1, weight_decay=weight_decay,
                                  scale_parameter=scale_parameter, relative_step=relative_step,
                                  warmup_init=warmup_init),
    )


# -- Adam's relatives (torch.optim's computations; see adam_family for where optax differs) ------


def _l2_or_decoupled(weight_decay, decoupled: bool, mask=None):
    """(before, after) the preconditioner: torch's L2 on the gradient, or decoupled decay."""
    decay = _decay(weight_decay, mask)
    return (identity(), decay) if decoupled else (decay, identity())


def adamax(learning_rate, b1=0.9, b2=0.999, eps=1e-8, *, weight_decay=0.0) -> GradientTransformation:
    """Adamax (optax defaults; matches ``torch.optim.Adamax``, whose ``weight_decay`` is L2)."""
    return chain(_decay(weight_decay, None), F.scale_by_adamax(b1, b2, eps), T.scale_by_learning_rate(learning_rate))


def radam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, *, weight_decay=0.0,
          decoupled_weight_decay: bool = False) -> GradientTransformation:
    """RAdam matching ``torch.optim.RAdam`` (see ``scale_by_radam`` for optax's two differences)."""
    before, after = _l2_or_decoupled(weight_decay, decoupled_weight_decay)
    return chain(before, F.scale_by_radam(b1, b2, eps, threshold), after, T.scale_by_learning_rate(learning_rate))


def nadam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None) -> GradientTransformation:
    """optax's NAdam: Adam with Nesterov momentum (``scale_by_adam(nesterov=True)``), constant ``b1``.

    Not ``torch.optim.NAdam``, which schedules the momentum (``momentum_decay``): that is
    :func:`nadam_torch`. The two give different numbers from the first step.
    """
    return chain(T.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=True),
                 T.scale_by_learning_rate(learning_rate))


def nadam_torch(learning_rate, b1=0.9, b2=0.999, eps=1e-8, *, momentum_decay=4e-3, weight_decay=0.0,
                decoupled_weight_decay: bool = False) -> GradientTransformation:
    """NAdam matching ``torch.optim.NAdam`` (Dozat's momentum schedule, ``momentum_decay``; L2 or
    decoupled ``weight_decay``). optax's definition is :func:`nadam`."""
    before, after = _l2_or_decoupled(weight_decay, decoupled_weight_decay)
    return chain(before, F.scale_by_nadam_torch(b1, b2, eps, momentum_decay), after,
                 T.scale_by_learning_rate(learning_rate))


def adadelta(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.0) -> GradientTransformation:
    """Adadelta matching ``torch.optim.Adadelta`` (L2 ``weight_decay``; torch's ``lr=1.0`` default,
    optax requires a learning rate)."""
    return chain(_decay(weight_decay, None), F.scale_by_adadelta(rho, eps), T.scale_by_learning_rate(learning_rate))


# -- trust ratios, Muon ---------------------------------------------------------------------------


def lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, *, mask=None) -> GradientTransformation:
    """LAMB (You et al. 2020), optax's definition: Adam direction plus decoupled decay, scaled per
    leaf by ``||param|| / ||direction||``."""
    return chain(T.scale_by_adam(b1, b2, eps), _decay(weight_decay, mask), R.scale_by_trust_ratio(),
                 T.scale_by_learning_rate(learning_rate))


def lars(learning_rate, weight_decay=0.0, trust_coefficient=0.001, eps=0.0, momentum=0.9,
         nesterov: bool = False, *, mask=None) -> GradientTransformation:
    """LARS (You et al. 2017), optax's definition: L2 decay, trust ratio
    ``trust_coefficient * ||param|| / (||g|| + eps)``, learning rate, then momentum."""
    return chain(_decay(weight_decay, mask), R.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
                 T.scale_by_learning_rate(learning_rate),
                 T.trace(momentum, nesterov=nesterov) if _has_momentum(momentum) else identity())


def muon(learning_rate, beta=0.95, weight_decay=0.1, *, nesterov: bool = True, ns_steps: int = 5,
         adjust_lr_fn: str | None = None, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, adam_weight_decay=0.0,
         muon_labels=None) -> GradientTransformation:
    """Muon for the 2-D parameters (``torch.optim.Muon``), AdamW for the others.

    ``muon_labels(name, param) -> bool`` picks the Muon parameters (default: ``param.ndim == 2``;
    embeddings and output heads are often better left to AdamW).
    """
    from functrain.core.optim.combine import partition

    pick = muon_labels or (lambda name, p: p.ndim == 2)
    return partition(
        {"muon": chain(M.scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn),
                       _decay(weight_decay, None), T.scale_by_learning_rate(learning_rate)),
         "adam": adamw(learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay)},
        lambda name, p: "muon" if pick(name, p) else "adam",
    )
