"""What a transformers model needs before a pure step runs it, applied in one place.

Both functions are idempotent and read only Python structure (attributes, hooks), never a tensor:
``pin_loss_function`` before any step (training or evaluation) runs the model,
``prepare_for_differentiation`` before a training step takes gradients through it.
"""

from __future__ import annotations

from torch import nn


def pin_loss_function(model: nn.Module) -> None:
    """Resolve a transformers model's ``loss_function`` once, outside the compiled step.

    For models whose ``loss_type`` is not in ``LOSS_MAPPING`` (``GPT2LMHeadModel`` among them)
    the ``loss_function`` property logs a warning and falls back to ``ForCausalLMLoss`` on every
    forward; a logger call inside ``torch.compile(fullgraph=True)`` is a graph break. Setting the
    attribute to the function the property would return keeps the behaviour and the graph whole.
    Wrapped models (a ``peft.PeftModel`` around a transformers model) get their inner model pinned.
    """
    for m in model.modules():
        _pin_one_loss_function(m)


def _pin_one_loss_function(model: nn.Module) -> None:
    if "_loss_function" in vars(model) or not isinstance(type(model).__dict__.get("loss_function")
                                                         or getattr(type(model), "loss_function", None), property):
        return
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except Exception:
        return
    if getattr(model, "loss_type", None) not in LOSS_MAPPING:
        model.loss_function = model.loss_function


def prepare_for_differentiation(model: nn.Module) -> None:
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
