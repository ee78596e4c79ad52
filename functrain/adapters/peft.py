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
* populations of adapters over ONE frozen base (:func:`create_adapter_population`,
  :func:`save_member_adapters`); see ``docs/peft.md``.

``peft`` is imported only when a model already is a ``PeftModel`` (so it stays optional).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
from torch import nn

from functrain.core.state import TrainState
from functrain.step import population as P

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


# -- populations of adapters over one base ------------------------------------------------------


def _adapter_params_for_seed(model, adapter: str, seed: int) -> dict:
    """Fresh adapter parameters as peft initializes them under ``torch.manual_seed(seed)``.

    A temporary adapter is added (peft's own init for every adapter type), read under the
    trainable adapter's names, then deleted: the base is never copied.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tmp = f"functrain_member_{seed}"
    config = copy.deepcopy(model.peft_config[adapter])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(tmp, config)
    try:
        own = dict(model.named_parameters())
        out = {}
        for name in names:
            # The adapter's name is one segment of the parameter's ("...lora_A.default.weight", "...ia3_l.default").
            fresh = ".".join(tmp if part == adapter else part for part in name.split("."))
            if fresh not in own:
                raise ValueError(f"trainable parameter {name!r} does not belong to adapter {adapter!r}; a population "
                                 "of adapters trains the adapter's tensors only (no modules_to_save)")
            out[name] = own[fresh].detach().clone()
    finally:
        model.set_adapter(adapter)
        model.delete_adapter(tmp)
    return out


def create_adapter_population(model, tx_factory: Callable, hyperparams: Sequence[Mapping], *,
                              seeds: Sequence[int] | None = None) -> tuple[TrainState, object]:
    """N adapters over ONE frozen base: ``(stacked_state, tx)`` for
    ``make_population_train_step(model, tx, buffers="shared")``.

    Member i's adapter is initialized by peft under ``torch.manual_seed(seeds[i])`` (LoRA's
    ``lora_A`` differs by seed, ``lora_B`` starts at zero) and trained with
    ``tx_factory(**hyperparams[i])`` (an :func:`functrain.optim.inject_hyperparams` factory, so
    learning rates and the like are tensors in each member's state). ``params`` and the optimizer
    state get a leading member dim N; ``buffers`` (the frozen base) are the model's own tensors,
    once, not stacked.
    """
    if not is_peft_model(model):
        raise TypeError(f"create_adapter_population needs a peft.PeftModel, got {type(model).__name__}")
    adapter = active_adapter(model)
    hyperparams = [dict(h) for h in hyperparams]
    if not hyperparams:
        raise P.PopulationError("create_adapter_population needs at least one member (hyperparams is empty)")
    seeds = list(range(len(hyperparams))) if seeds is None else list(seeds)
    if len(seeds) != len(hyperparams):
        raise P.PopulationError(f"got {len(seeds)} seeds for {len(hyperparams)} members")
    base = TrainState.create(model, tx_factory(**hyperparams[0]), seed=seeds[0])
    states, txs = [], []
    for seed, hp in zip(seeds, hyperparams):
        tx = tx_factory(**hp)
        params = _adapter_params_for_seed(model, adapter, seed)
        state = TrainState.create(model, tx, seed=seed).replace(params=params, opt_state=tx.init(params))
        states.append(state.replace(buffers=base.buffers))
        txs.append(tx)
    stacked = P.stack_states(states, buffers="shared")
    P._check_varying_hyperparams(hyperparams, states[0].opt_state)
    return stacked, txs[0]


def save_member_adapters(model, state: TrainState, output_dir: str, *, names: Sequence[str] | None = None) -> list[str]:
    """Save each member of a population as its own adapter folder (``member-{i}`` by default).

    Each folder is what ``save_pretrained`` writes for the PeftModel with member i's adapter
    tensors, so ``PeftModel.from_pretrained(base, folder)`` loads it. ``model``'s own adapter
    tensors are restored afterwards.
    """
    members = P.unstack_state(state, buffers="shared")
    names = [f"member-{i}" for i in range(len(members))] if names is None else list(names)
    if len(names) != len(members):
        raise ValueError(f"got {len(names)} names for {len(members)} members")
    own = dict(model.named_parameters())
    saved = {k: own[k].detach().clone() for k in members[0].params}
    paths = []
    try:
        for name, member in zip(names, members):
            _copy_into(own, member.params)
            path = os.path.join(output_dir, name)
            write_adapter(model, path)
            paths.append(path)
    finally:
        _copy_into(own, saved)
    return paths


def _copy_into(own: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in values.items():
            own[k].copy_(v)
