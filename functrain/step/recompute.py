"""Activation (gradient) checkpointing for plain modules, compatible with the pure step.

``checkpoint_modules(model, predicate_or_types)`` makes chosen submodules recompute their
forward during the backward instead of keeping activations. It uses
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the reentrant variant only works with
``.backward()``, not with the ``torch.autograd.grad`` call the step makes.
Under ``compile=True`` the step compiles each microbatch's forward (and the backward the
compiler makes for it) instead of the whole step, as ``torch.compile(model)`` does: torch 2.13's
forward-loss-backward graph rematerializes a single region and no random ops (dropout), while the
forward's own graph handles both; accumulation and the update then run eagerly around it.
(transformers models: call ``model.gradient_checkpointing_enable()``; transformers 5 defaults
to ``use_reentrant=False``, and ``make_train_step`` rejects the reentrant form with a clear error.)
"""

from __future__ import annotations

from typing import Callable

import torch.utils.checkpoint
from torch import nn

_ORIGINAL_FORWARD = "_functrain_original_forward"


def checkpoint_modules(model: nn.Module, predicate_or_types) -> list[str]:
    """Wrap the forward of each submodule selected by ``predicate_or_types`` in a checkpoint.

    ``predicate_or_types`` is a module class, a tuple of classes, or ``fn(name, module) -> bool``.
    Modules inside an already wrapped module are skipped (one level of recomputation). The
    module's parameters, buffers and names are unchanged, so a ``TrainState`` made before or
    after wrapping works the same. Returns the names of the wrapped modules.
    """
    select = _selector(predicate_or_types)
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped) or not select(name, module):
            continue
        if _ORIGINAL_FORWARD in vars(module):
            continue
        _wrap(module)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"checkpoint_modules: no submodule of {type(model).__name__} matched {predicate_or_types!r}")
    return wrapped


def uncheckpoint_modules(model: nn.Module) -> None:
    """Undo :func:`checkpoint_modules`."""
    for module in model.modules():
        if _ORIGINAL_FORWARD in vars(module):
            del vars(module)[_ORIGINAL_FORWARD]
            vars(module).pop("forward", None)  # back to the class's forward


def is_checkpointed(module: nn.Module) -> bool:
    """True if :func:`checkpoint_modules` wrapped this module."""
    return _ORIGINAL_FORWARD in vars(module)


def _selector(predicate_or_types) -> Callable[[str, nn.Module], bool]:
    if isinstance(predicate_or_types, type) or (
            isinstance(predicate_or_types, tuple) and all(isinstance(t, type) for t in predicate_or_types)):
        return lambda name, module: isinstance(module, predicate_or_types)
    if callable(predicate_or_types):
        return predicate_or_types
    raise TypeError(f"expected a module class, a tuple of classes or a predicate(name, module), got {predicate_or_types!r}")


def _wrap(module: nn.Module) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        if not module.training:  # eval: nothing to save, run plainly
            return original(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

    setattr(module, _ORIGINAL_FORWARD, original)
    module.forward = forward


def uses_checkpointing(model: nn.Module) -> bool:
    """Whether any submodule recomputes its activations (transformers' flag or ours)."""
    return any(getattr(m, "gradient_checkpointing", False) is True or is_checkpointed(m) for m in model.modules())
