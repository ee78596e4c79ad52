"""TrainState: everything a training step reads and writes, as one immutable pytree."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import optree
import torch
from torch import nn

from functrain.core import rng as rnglib
from functrain.core.tree import NAMESPACE

def static_field(**kwargs):
    """A dataclass field of a TrainState subclass that is NOT a pytree leaf (Flax's
    ``struct.field(pytree_node=False)``): a config value, a function. It travels in the tree's
    structure, so states differing in it do not map or stack together, and it is not saved in
    checkpoints (the template given to the loader supplies it)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


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

    Subclass it as Flax users do: a frozen dataclass adding fields (with defaults) is a pytree like
    the base class (its fields are leaves, or structure with :func:`static_field`), so it maps,
    compiles, checkpoints and stacks into populations the same way::

        @dataclasses.dataclass(frozen=True, eq=False)
        class EMAState(TrainState):
            ema_params: dict = dataclasses.field(default_factory=dict)
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
        names = self.__dataclass_fields__  # (dataclasses.fields() does not trace under torch.compile)
        unknown = set(changes) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}; fields are {list(names)}")
        return dataclasses.replace(self, **changes)

    def apply_gradients(self, *, grads, tx, **changes) -> "TrainState":
        """One optimizer update (Flax's ``apply_gradients``): ``tx.update`` on ``grads``,
        ``apply_updates`` on the params, ``step + 1``; other fields replaced by ``changes``.

        ``tx`` is passed rather than stored: an optimizer object in the state would make the
        tree's structure depend on it, so states of equal optimizers could not be compared,
        restored into or stacked as a population. Pure: traces under ``torch.compile``.
        """
        from functrain.core.optim.base import apply_updates

        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(params=apply_updates(self.params, updates), opt_state=opt_state, step=self.step + 1,
                            **changes)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Every subclass is a pytree node (leaves: its dataclass fields, read when flattened, since
        # @dataclass runs after this); its consumed twin is made alongside.
        optree.register_pytree_node(cls, _flatten, functools.partial(_unflatten, cls), namespace=NAMESPACE)
        if not cls.__dict__.get("_is_consumed_class", False):
            cls._consumed_class = type(f"_Consumed{cls.__name__}", (_ConsumedMixin, cls),
                                       {"_is_consumed_class": True, "__module__": cls.__module__})

    # -- donation bookkeeping -------------------------------------------------------------------
    # A live state has no per-access check (a custom ``__getattribute__`` would stop
    # ``torch.compile(fullgraph=True)`` from tracing any function that reads a field). Consuming
    # a state switches its class to its consumed twin (``_ConsumedMixin``), whose field access raises.
    _consumed_by = None

    def mark_consumed(self, by: str = "a donated step") -> None:
        """Mark this state as donated to ``by``: any later field access raises ConsumedStateError."""
        object.__setattr__(self, "_consumed_by", by)
        object.__setattr__(self, "__class__", type(self)._consumed_class)

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
        name = type(self).__name__
        if self.consumed:
            return f"{name.removeprefix('_Consumed')}(<consumed>)"
        n = sum(p.numel() for p in self.params.values())
        return f"{name}(step={int(self.step)}, params={len(self.params)} tensors/{n:,} elements)"


class _ConsumedMixin:
    """Mixed into a state's class when it is consumed: reading any field raises ConsumedStateError."""

    def __getattribute__(self, name):
        if name in _field_names(type(self)):
            object.__getattribute__(self, "_check_alive")()
        return object.__getattribute__(self, name)


def split_parameters(model: nn.Module) -> tuple[dict, dict]:
    """``(trainable, frozen)`` parameters by name, each tied tensor listed once."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = p
    return trainable, frozen


@functools.cache
def _field_names(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _split_fields(cls) -> tuple[tuple, tuple]:
    """``(leaf fields, static fields)`` of a state class."""
    fields = dataclasses.fields(cls)
    return (tuple(f.name for f in fields if not f.metadata.get("static")),
            tuple(f.name for f in fields if f.metadata.get("static")))


def _flatten(state: TrainState):
    state._check_alive()
    d = state.__dict__
    leaves, static = _split_fields(type(state))
    return tuple(d[f] for f in leaves), (leaves, tuple(d[f] for f in static)), leaves


def _unflatten(cls, aux, children) -> TrainState:
    leaves, static_values = aux
    static = _split_fields(cls)[1]
    return cls(**dict(zip(leaves, children)), **dict(zip(static, static_values)))


optree.register_pytree_node(TrainState, _flatten, functools.partial(_unflatten, TrainState), namespace=NAMESPACE)
TrainState._consumed_class = type("_ConsumedTrainState", (_ConsumedMixin, TrainState), {"_is_consumed_class": True})
