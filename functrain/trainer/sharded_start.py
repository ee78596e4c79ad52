"""Sharded start-up without the whole model on any rank (``fsdp="full_shard"`` with ``model_init``,
or a model given on the meta device).

The Trainer builds the model with ``model_init`` on the ``meta`` device (no storage), then
:func:`functrain.parallel.fsdp.sharded_state_from_meta` materializes, initializes and shards it
module by module, so a rank holds at most one module's full parameters at a time. When training
starts the module's parameters become those shards (``DTensor``, as FSDP2's ``fully_shard``
leaves a module), and stay shards after training. The random state right after
``model_init`` is kept and replayed for the initialization, so the weights are the ones the same
``model_init`` builds on the CPU (for models whose modules initialize in ``reset_parameters``, as
``torch.nn`` layers do, in module order). A model that cannot be built that way (buffers, tied
weights, modules without ``reset_parameters``) is built whole, as before.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from functrain.parallel import distributed as fd
from functrain.parallel import fsdp

logger = logging.getLogger(__name__)


class MetaStart:
    """A model built on the meta device and the random state to initialize it with."""

    def __init__(self, model: nn.Module, rng_state: torch.Tensor):
        self.model, self.rng_state = model, rng_state

    def sharded_state(self, tx, seed: int):
        """The sharded TrainState, initialized as ``model_init`` would have on the CPU."""
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(self.rng_state)
            return fsdp.sharded_state_from_meta(self.model, tx, seed=seed)


def build(model_init, sharded: bool) -> tuple[nn.Module, MetaStart | None]:
    """``model_init()`` on the meta device when sharded across ranks and the model allows it."""
    if not (sharded and fd.is_distributed()):
        return model_init(), None
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = model_init()
        rng_state = torch.random.get_rng_state()
    problem = _meta_problem(model)
    if problem is not None:
        logger.info("fsdp: %s is built whole on every rank (%s)", type(model).__name__, problem)
        return model_init(), None
    return model, MetaStart(model, rng_state)


def adopt(model: nn.Module, sharded: bool) -> MetaStart | None:
    """A model handed over on the meta device: sharded across ranks, each rank materializes and
    initializes its shards (``reset_parameters``, from the random state at this call: after the
    Trainer's ``set_seed(args.seed)``); anything else is refused, as it has no weights."""
    if not is_meta(model):
        return None
    problem = "the run is not sharded across ranks" if not (sharded and fd.is_distributed()) else _meta_problem(model)
    if problem is not None:
        raise ValueError(f"the model is on the meta device (no weights) and cannot be initialized here: {problem}. "
                         "Pass model_init=... (built on meta and sharded when fsdp is set), or a model with real "
                         "weights")
    return MetaStart(model, torch.random.get_rng_state())


def _meta_problem(model: nn.Module) -> str | None:
    try:
        fsdp.check_meta_model(model)
    except ValueError as e:
        return str(e)
    return None


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())

