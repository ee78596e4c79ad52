"""Populations of PEFT adapters over ONE frozen base model (see ``docs/peft.md``).

:func:`create_adapter_population` builds the stacked state a vmapped population step trains
(``make_population_train_step(model, tx, buffers="shared")``); :func:`save_member_adapters`
writes each member as its own adapter folder that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
from torch import nn

from functrain.adapters.peft import active_adapter, is_peft_model, write_adapter
from functrain.core.state import TrainState
from functrain.step import population as P



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
    P.check_varying_hyperparams(hyperparams, states[0].opt_state)
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
