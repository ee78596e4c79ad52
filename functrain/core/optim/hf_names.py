"""Hugging Face ``optim=`` names -> functrain optimizers: one table, read by the Trainer and by
argument validation.

Each builder makes what ``transformers.Trainer`` builds for that name: the torch optimizer's
defaults (not optax's, where they differ: ``sgd`` has momentum 0, ``rmsprop`` decay 0.99 with
``eps`` outside the square root), ``adam_beta1/2``/``adam_epsilon`` where HF passes them, weight
decay only on the parameters HF decays (``mask``), and HF's ``optim_args`` (parsed to a dict)
under torch's argument names.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from functrain.core.optim import aliases as A
from functrain.core.optim import schedule_free as SF
from functrain.core.optim.base import GradientTransformation, chain
from functrain.core.optim.combine import masked, partition
from functrain.core.optim.transforms import add_decayed_weights


class HFHyperparams(NamedTuple):
    """The ``TrainingArguments`` values an optimizer builder reads."""

    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    mask: Any = None  # which parameters get weight decay (a mask or a function of the params)
    optim_args: dict = {}
    warmup_steps: int = 0  # HF passes its warmup to the schedule-free optimizers too
    galore_targets: frozenset = frozenset()  # parameter names from optim_target_modules (galore_target_names())
    decay_names: frozenset = frozenset()  # the parameters HF decays (decay_parameter_names), for Adafactor's groups


def _decays(weight_decay) -> bool:
    """Whether to build the weight-decay branch: a tensor weight decay (a population member's, read
    from the optimizer state) always takes it, since decay 0 adds exactly 0 * param."""
    return isinstance(weight_decay, torch.Tensor) or weight_decay > 0


def _l2_masked(hp: HFHyperparams, base: GradientTransformation) -> GradientTransformation:
    """torch's L2 ``weight_decay`` on HF's decay group only: added to the gradient, masked."""
    if not _decays(hp.weight_decay):
        return base
    decay = add_decayed_weights(hp.weight_decay)
    return chain(masked(decay, hp.mask) if hp.mask is not None else decay, base)


def _only(name: str, args: dict, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"optim={name!r}: optim_args {unknown} are not understood; expected some of {list(allowed)}")
    return args


def _adamw(lr, hp: HFHyperparams):
    return A.adamw(lr, b1=hp.adam_beta1, b2=hp.adam_beta2, eps=hp.adam_epsilon, weight_decay=hp.weight_decay,
                   mask=hp.mask, **hp.optim_args)


def _adam(lr, hp: HFHyperparams):
    return A.adam(lr, b1=hp.adam_beta1, b2=hp.adam_beta2, eps=hp.adam_epsilon, **hp.optim_args)


def _lion(lr, hp: HFHyperparams):
    return A.lion(lr, b1=hp.adam_beta1, b2=hp.adam_beta2, weight_decay=hp.weight_decay, mask=hp.mask, **hp.optim_args)


def _adafactor(lr, hp: HFHyperparams):
    """As transformers.Trainer builds it: an external lr (scale_parameter=False, relative_step=False,
    warmup_init=False) and weight decay only on the decay parameters (its two param groups)."""
    kw = dict(scale_parameter=False, relative_step=False, warmup_init=False, **hp.optim_args)
    if not _decays(hp.weight_decay):
        return A.adafactor(lr, **kw)
    return partition({"decay": A.adafactor(lr, weight_decay=hp.weight_decay, **kw), "no_decay": A.adafactor(lr, **kw)},
                     lambda name, _param: "decay" if name in hp.decay_names else "no_decay")


def _sgd(lr, hp: HFHyperparams):
    """``torch.optim.SGD``: momentum 0 unless ``optim_args`` say otherwise."""
    extra = _only("sgd", hp.optim_args, ("momentum", "dampening", "nesterov"))
    return _l2_masked(hp, A.sgd(lr, momentum=extra.get("momentum", 0.0), nesterov=extra.get("nesterov", False),
                                dampening=extra.get("dampening", 0.0)))


def _rmsprop(lr, hp: HFHyperparams):
    """``torch.optim.RMSprop``: ``alpha=0.99``, ``eps=1e-8`` added outside the square root."""
    extra = _only("rmsprop", hp.optim_args, ("alpha", "eps", "momentum", "centered"))
    return _l2_masked(hp, A.rmsprop(lr, decay=extra.get("alpha", 0.99), eps=extra.get("eps", 1e-8), eps_in_sqrt=False,
                                    centered=extra.get("centered", False), momentum=extra.get("momentum", 0.0)))


def _adagrad(lr, hp: HFHyperparams):
    extra = _only("adagrad", hp.optim_args, ("lr_decay", "eps", "initial_accumulator_value"))
    return _l2_masked(hp, A.adagrad(lr, **extra))


def _schedule_free_settings(name, hp: HFHyperparams) -> dict:
    extra = _only(name, hp.optim_args, ("weight_lr_power", "r"))
    return dict(weight_decay=hp.weight_decay, mask=hp.mask, warmup_steps=hp.warmup_steps,
                weight_lr_power=float(extra.get("weight_lr_power", 2.0)), r=float(extra.get("r", 0.0)))


def _schedule_free_adamw(lr, hp: HFHyperparams):
    """``schedulefree.AdamWScheduleFree`` as HF builds it (its warmup on top of HF's schedule)."""
    return SF.schedule_free_adamw(lr, hp.adam_beta1, hp.adam_beta2, hp.adam_epsilon,
                                  **_schedule_free_settings("schedule_free_adamw", hp))


def _schedule_free_sgd(lr, hp: HFHyperparams):
    return SF.schedule_free_sgd(lr, **_schedule_free_settings("schedule_free_sgd", hp))


def _galore_settings(name: str, hp: HFHyperparams) -> dict:
    """HF's GaLore ``optim_args`` (with its defaults) and the targets from ``optim_target_modules``."""
    extra = _only(name, hp.optim_args, ("rank", "update_proj_gap", "scale", "proj_type"))
    if not hp.galore_targets:
        raise ValueError(f"optim={name!r} needs optim_target_modules (a list of module names, a regex or "
                         "'all-linear') naming the linear layers to project")
    return dict(targets=hp.galore_targets, rank=int(extra.get("rank", 128)),
                update_proj_gap=int(extra.get("update_proj_gap", 200)), scale=float(extra.get("scale", 0.25)),
                proj_type=str(extra.get("proj_type", "std")))


def _galore_adamw(lr, hp: HFHyperparams):
    """``galore_torch.GaLoreAdamW`` as HF builds it: only ``lr`` is passed (galore-torch's betas,
    ``eps=1e-6``, no weight decay); ``optim_args`` give the projection settings."""
    from functrain.core.optim.galore import galore_adamw

    return galore_adamw(lr, **_galore_settings("galore_adamw", hp))


def _galore_adafactor(lr, hp: HFHyperparams):
    """``galore_torch.GaLoreAdafactor`` as HF builds it: ``lr`` with ``scale_parameter=False,
    relative_step=False`` (Adafactor's other defaults, no weight decay); ``optim_args`` give the
    projection settings."""
    from functrain.core.optim.galore import galore_adafactor

    return galore_adafactor(lr, scale_parameter=False, relative_step=False,
                            **_galore_settings("galore_adafactor", hp))


HF_OPTIMIZERS: dict[str, Callable[[Any, HFHyperparams], GradientTransformation]] = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": _adamw,
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "adafactor": _adafactor,
    "lion": _lion,
    "lion_32bit": _lion,
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
    "schedule_free_adamw": _schedule_free_adamw,
    "schedule_free_sgd": _schedule_free_sgd,
    "galore_adamw": _galore_adamw,
    "galore_adafactor": _galore_adafactor,
}

# HF names functrain refuses, with why and what to use instead.
REFUSED_HF_OPTIMIZERS = {
    "galore_adamw_8bit": "8-bit (bitsandbytes-quantized) GaLore moments are not implemented; use optim='galore_adamw' "
                         "or 'galore_adafactor' (their moments are already rank-sized)",
    "schedule_free_radam": "schedule-free RAdam is not implemented; use optim='schedule_free_adamw'",
    **{name: "layer-wise optimizers step inside backward hooks, which a pure train step has none of; use "
             "optim='galore_adamw' or 'galore_adafactor' (their memory saving comes from the low-rank moments)"
       for name in ("galore_adamw_layerwise", "galore_adafactor_layerwise", "galore_adamw_8bit_layerwise")},
}


def build_hf_optimizer(name: str, learning_rate, hp: HFHyperparams) -> GradientTransformation:
    """The optimizer ``transformers.Trainer`` would build for ``optim=name`` (see the table above)."""
    if name in REFUSED_HF_OPTIMIZERS:
        raise ValueError(f"optim={name!r}: {REFUSED_HF_OPTIMIZERS[name]}")
    if name not in HF_OPTIMIZERS:
        raise ValueError(f"optim={name!r} is not a known optimizer; known: {list(HF_OPTIMIZERS)}")
    return HF_OPTIMIZERS[name](learning_rate, hp)


# -- Trainer(optimizer_cls_and_kwargs=(cls, kwargs)) -----------------------------------------------


def _torch_adam(lr, hp: HFHyperparams):
    """``torch.optim.Adam`` in HF's two param groups: its L2 ``weight_decay`` on the decay group."""
    return _l2_masked(hp, A.adam(lr, b1=hp.adam_beta1, b2=hp.adam_beta2, eps=hp.adam_epsilon))


class TorchClass(NamedTuple):
    """How a torch optimizer class is built: its builder above and the kwargs it takes (``betas``
    and ``eps`` of the Adam family become ``adam_beta1/2`` / ``adam_epsilon``, the others reach the
    builder as ``optim_args``)."""

    build: Callable[[Any, HFHyperparams], GradientTransformation]
    adam_kwargs: bool
    extra_kwargs: tuple[str, ...] = ()
    leafwise: bool = True  # each parameter updated from its own gradient, state and value (masked L2 too)


# What transformers' Trainer builds for optimizer_cls_and_kwargs=(cls, kwargs): cls(its decay / no-decay
# param groups, weight_decay from TrainingArguments, **kwargs), its schedule over kwargs' lr.
TORCH_OPTIMIZER_CLASSES: dict[type, TorchClass] = {
    torch.optim.AdamW: TorchClass(_adamw, True),
    torch.optim.Adam: TorchClass(_torch_adam, True),
    torch.optim.SGD: TorchClass(_sgd, False, ("momentum", "dampening", "nesterov")),
    torch.optim.RMSprop: TorchClass(_rmsprop, False, ("alpha", "eps", "momentum", "centered")),
    torch.optim.Adagrad: TorchClass(_adagrad, False, ("lr_decay", "eps", "initial_accumulator_value")),
}
# kwargs that choose how torch runs the update, not what it computes.
TORCH_IMPLEMENTATION_KWARGS = ("foreach", "fused", "capturable", "differentiable")
# kwargs whose non-default value changes the update in a way no builder above implements.
TORCH_UNSUPPORTED_FLAGS = ("amsgrad", "maximize")
