"""PEFT models (the ``peft`` package: LoRA, IA3, LoHa, prompt tuning, ...) in functrain.

A ``PeftModel`` wraps a frozen base model and adds small trainable adapter tensors. Nothing in
the pure step is PEFT-specific: ``TrainState.create`` puts the trainable (adapter) parameters in
``params`` (the only ones the optimizer sees) and the frozen base in ``buffers``, sharing storage
with the module (kept once, never copied by a step). What the drivers need is here:

* the forward signature: ``PeftModel.forward`` takes ``*args, **kwargs``, so column filtering
  and label names read the *base* model's signature, as ``transformers.Trainer`` does
  (``_set_signature_columns_if_needed``, ``unwrap_peft_model``);
* saving: ``save_pretrained`` of a ``PeftModel`` writes the adapter only (``adapter_config.json``,
  ``adapter_model.safetensors``, a model card), which ``PeftModel.from_pretrained(base, folder)``
  loads; :func:`save_merged` writes the base with the adapter merged in (``merge_and_unload``);
* populations of adapters over ONE frozen base live with the population driver
  (:mod:`functrain.trainer.adapter_population`); see ``docs/peft.md``.

``peft`` is imported only when a model already is a ``PeftModel`` (so it stays optional).
"""

from __future__ import annotations

import copy
import sys

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` / ``PeftMixedModel`` (without importing peft otherwise)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftMixedModel, PeftModel

    return isinstance(model, (PeftModel, PeftMixedModel))


def forward_model(model):
    """The module whose ``forward`` signature names the inputs: the base model of a PeftModel.

    Same rule as ``transformers.Trainer._set_signature_columns_if_needed``: ``get_base_model()``,
    or ``base_model.model`` for a ``PeftMixedModel``.
    """
    if not is_peft_model(model):
        return model
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model.base_model.model


def active_adapter(model) -> str:
    """The name of the one active adapter (several active adapters are refused: which to train?)."""
    names = model.active_adapters if isinstance(model.active_adapters, (list, tuple)) else [model.active_adapters]
    if len(names) != 1:
        raise ValueError(f"the PeftModel has {len(names)} active adapters {list(names)}; functrain trains one: "
                         "call model.set_adapter(name) first")
    return names[0]


def check_trainer_arguments(model, args) -> None:
    """Refuse what the Trainer cannot do with a PeftModel, saying what to use instead."""
    if not is_peft_model(model):
        return
    active_adapter(model)
    if args.sharded:
        # Sharded mode shards the state's params (here: the adapters, a few MB at most) and keeps
        # buffers (here: the frozen base, the bulk) replicated, so it would save nothing.
        raise ValueError("fsdp='full_shard' with a PeftModel: functrain's sharded mode shards the trainable "
                         "params (the adapters, which are small) and keeps the frozen base replicated on every "
                         "rank, so it saves no memory. Train adapters with plain data parallel (leave fsdp "
                         "unset): the adapters are replicated and their gradients all-reduced")


def write_adapter(model, folder: str) -> None:
    """``save_pretrained``: the adapter files only, as transformers' Trainer saves a PeftModel."""
    model.save_pretrained(folder)


def save_merged(model, folder: str, *, processing_class=None) -> None:
    """Write the base model with the adapter merged in (``merge_and_unload``), loadable by
    ``AutoModel...from_pretrained(folder)`` without peft.

    The merge runs on a copy (it rewrites the adapted layers in place), so ``model`` keeps
    training; the copy costs one base model of memory while it is written.
    """
    if not is_peft_model(model):
        raise TypeError(f"merge_adapter=True needs a peft.PeftModel, got {type(model).__name__}; a plain model "
                        "has no adapter to merge (save it with save_model())")
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"{type(model).__name__} cannot merge its adapter (no merge_and_unload: prompt-learning "
                        "adapters such as prompt tuning add inputs, not weights); save the adapter instead")
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(folder)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(folder)
