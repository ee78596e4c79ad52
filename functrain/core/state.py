"""TrainState: everything a training step reads and writes, as one immutable pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import torch
from torch import nn

from functrain.core import rng as rnglib
from functrain.core.tree import NAMESPACE

_FIELDS = ("step", "params", "buffers", "opt_state", "rng", "loss_scale", "extras")


class ConsumedStateError(RuntimeError):
    """Raised when a state whose storages were donated to a step is used again."""


@dataclasses.dataclass(frozen=True, eq=False)
class TrainState:
    """The whole training state as one immutable pytree.

    Fields:
        step: 0-d int64 tensor, the number of optimizer updates applied so far.
        params: ``{name: tensor}`` of the trainable parameters (what the optimizer sees).
        buffers: ``{name: tensor}`` of everything else the model needs: module buffers and
            frozen parameters (``requires_grad=False``), kept out of the optimizer.
        opt_state: the optimizer's state (a pytree of NamedTuples of tensors).
        rng: the random key (see :mod:`functrain.rng`), advanced every step.
        loss_scale: the dynamic loss scale for fp16 (a :class:`functrain.precision.DynamicScale`),
            or ``None``.
        extras: a dict for the user's own tensors (EMA weights, counters, ...), carried along.

    Instances are frozen: use :meth:`replace`. A state given to a step with ``donate=True`` is
    *consumed*: its storages now hold the new state, and any further use raises
    :class:`ConsumedStateError`.
    """

    step: torch.Tensor
    params: dict
    buffers: dict
    opt_state: Any
    rng: torch.Tensor
    loss_scale: Any = None
    extras: dict = dataclasses.field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: nn.Module,
        tx,
        *,
        seed: int = 0,
        loss_scale=None,
        extras: dict | None = None,
        copy: bool = False,
    ) -> "TrainState":
        """Build a state from a module and a gradient transformation.

        Trainable parameters are taken from ``model.named_parameters()``, which lists each tied
        (shared) tensor once, under its first name; ``torch.func.functional_call`` re-ties the
        aliases. Frozen parameters and buffers go to ``buffers``. By default the state's tensors
        share storage with the module (no copy); pass ``copy=True`` for independent tensors.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        params, frozen = split_parameters(model)
        params = {n: take(p) for n, p in params.items()}
        buffers = {n: take(p) for n, p in frozen.items()}
        buffers.update({n: take(b) for n, b in model.named_buffers()})
        if not params:
            raise ValueError("model has no trainable parameters (all have requires_grad=False)")
        opt_state = tx.init(params)
        device = next(iter(params.values())).device
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=rnglib.key(seed),
            loss_scale=loss_scale,
            extras=dict(extras or {}),
        )

    def replace(self, **changes) -> "TrainState":
        """A new state with some fields replaced (the others are shared, not copied)."""
        self._check_alive()
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"TrainState has no field(s) {sorted(unknown)}; fields are {list(_FIELDS)}")
        return dataclasses.replace(self, **changes)

    # -- donation bookkeeping -------------------------------------------------------------------
    # A live state has no per-access check (a custom ``__getattribute__`` would stop
    # ``torch.compile(fullgraph=True)`` from tracing any function that reads a field). Consuming
    # a state switches its class to ``_ConsumedTrainState``, whose field access raises.
    _consumed_by = None

    def mark_consumed(self, by: str = "a donated step") -> None:
        """Mark this state as donated to ``by``: any later field access raises ConsumedStateError."""
        object.__setattr__(self, "_consumed_by", by)
        object.__setattr__(self, "__class__", _ConsumedTrainState)

    @property
    def consumed(self) -> bool:
        return self._consumed_by is not None

    def _check_alive(self) -> None:
        by = self._consumed_by
        if by is not None:
            raise ConsumedStateError(
                f"this TrainState was donated to {by}: its tensors now hold the next state. "
                "Use the state that step returned, or call the step with donate=False to keep inputs."
            )

    def __repr__(self) -> str:
        if self.consumed:
            return "TrainState(<consumed>)"
        n = sum(p.numel() for p in self.params.values())
        return f"TrainState(step={int(self.step)}, params={len(self.params)} tensors/{n:,} elements)"


class _ConsumedTrainState(TrainState):
    """The class of a consumed state: reading any field raises :class:`ConsumedStateError`."""

    def __getattribute__(self, name):
        if name in _FIELDS:
            object.__getattribute__(self, "_check_alive")()
        return object.__getattribute__(self, name)


def split_parameters(model: nn.Module) -> tuple[dict, dict]:
    """``(trainable, frozen)`` parameters by name, each tied tensor listed once."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = p
    return trainable, frozen


def _flatten(state: TrainState):
    state._check_alive()
    d = state.__dict__
    return tuple(d[f] for f in _FIELDS), None, _FIELDS


def _unflatten(_aux, children) -> TrainState:
    return TrainState(*children)


optree.register_pytree_node(TrainState, _flatten, _unflatten, namespace=NAMESPACE)
# Registered too so that flattening a consumed state raises instead of treating it as a leaf.
optree.register_pytree_node(_ConsumedTrainState, _flatten, _unflatten, namespace=NAMESPACE)
