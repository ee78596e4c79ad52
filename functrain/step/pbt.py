"""Population-based training (Jaderberg et al. 2017) as a pure function over a stacked state.

Every ``pbt_interval`` steps the driver ranks the members (by an evaluation score) and calls
:func:`exploit_and_explore`: the members in the bottom ``fraction`` copy the parameters, buffers,
optimizer state (and loss scale) of members drawn from the top ``fraction`` (*exploit*, truncation
selection), then multiply the copied hyperparameters named in ``explore`` by a factor drawn from
``perturb`` (*explore*). The hyperparameters are the tensors that
:func:`functrain.optim.inject_hyperparams` keeps in the optimizer state, so the next step reads
them without recompiling.

It is a pure function of ``(stacked_state, scores, key)``: the same inputs give the same copies
and factors, so a run's copy schedule is reproducible from its seed. Each member keeps its own
step count and random key (a copy does not share its source's dropout stream).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from functrain.core import rng as rnglib
from functrain.core import tree
from functrain.core.optim.combine import InjectHyperparamsState
from functrain.core.state import TrainState

__all__ = ["PBTDecision", "exploit_and_explore", "injected_hyperparams"]


class PBTDecision(NamedTuple):
    """What one exploit/explore round did: ``sources[i]`` is the member whose state member ``i``
    now holds (``i`` itself when kept); ``factors[name][i]`` multiplied its hyperparameter."""

    sources: torch.Tensor  # (N,) int64
    factors: dict  # {name: (N,) float32}, 1.0 for members kept

    def copies(self) -> dict[int, int]:
        """``{replaced member: source member}`` (plain ints, for logs)."""
        return {i: s for i, s in enumerate(self.sources.tolist()) if i != s}


def _ranking(scores: torch.Tensor, greater_is_better: bool) -> torch.Tensor:
    """Member indices from best to worst; a NaN score (a diverged member) ranks last."""
    s = scores.detach().to("cpu", torch.float64)
    worst = -math.inf if greater_is_better else math.inf
    s = torch.where(torch.isnan(s), torch.full_like(s, worst), s)
    return torch.argsort(-s if greater_is_better else s, stable=True)


def _check_args(n: int, scores, fraction: float, perturb: Sequence[float]) -> int:
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor of shape ({n},), one score per member, got {shape}")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5] (the top and bottom quantiles may not overlap), got {fraction}")
    if not perturb or any(not (isinstance(f, (int, float)) and f > 0) for f in perturb):
        raise ValueError(f"perturb must be a non-empty sequence of positive factors, got {perturb!r}")
    if n < 2:
        raise ValueError(f"population-based training needs at least 2 members, got {n}")
    return max(1, int(n * fraction))


def injected_hyperparams(opt_state) -> dict:
    """``{name: (N,) tensor}`` of the injected hyperparameters of a stacked optimizer state."""
    found = {}
    for node in _injected_nodes(opt_state):
        found.update(node.hyperparams)
    return found


def _injected_nodes(x):
    if isinstance(x, InjectHyperparamsState):
        yield x
        yield from _injected_nodes(x.inner_state)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _injected_nodes(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _injected_nodes(v)


def _scale_hyperparams(x, factors: dict):
    """``x`` with each injected hyperparameter named in ``factors`` multiplied member-wise."""
    if isinstance(x, InjectHyperparamsState):
        hp = {k: v * factors[k].to(v.device, v.dtype) if k in factors else v for k, v in x.hyperparams.items()}
        return x._replace(hyperparams=hp, inner_state=_scale_hyperparams(x.inner_state, factors))
    if isinstance(x, dict):
        return {k: _scale_hyperparams(v, factors) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*[_scale_hyperparams(v, factors) for v in x])
    if isinstance(x, (tuple, list)):
        return type(x)(_scale_hyperparams(v, factors) for v in x)
    return x


def exploit_and_explore(state: TrainState, scores: torch.Tensor, key: torch.Tensor, *, fraction: float = 0.25,
                        explore: Sequence[str] = ("learning_rate",), perturb: Sequence[float] = (0.8, 1.2),
                        greater_is_better: bool = False, buffers: str = "stacked") -> tuple[TrainState, PBTDecision]:
    """One PBT round over a stacked state; returns ``(new_state, decision)``.

    Args:
        state: a stacked state (:func:`functrain.population.stack_states`), N >= 2 members.
        scores: ``(N,)`` one score per member (e.g. its eval loss); NaN ranks last.
        key: a random key (:func:`functrain.core.rng.key`) choosing sources and factors.
        fraction: the size of the bottom (replaced) and top (copied) quantiles, at least 1 member.
        explore: injected hyperparameter names to perturb after a copy (all must exist).
        perturb: the factors to draw from (uniformly), Jaderberg et al.'s 0.8 / 1.2 by default.
        greater_is_better: whether a higher score is better (accuracy) or lower (loss).
        buffers: ``"stacked"`` (each member's own, copied with its params) or ``"shared"`` (one
            set for all members, e.g. a frozen base model under adapters: left as it is).
    """
    if buffers not in ("stacked", "shared"):
        raise ValueError(f"buffers must be 'stacked' or 'shared', got {buffers!r}")
    n = state.step.shape[0] if isinstance(state, TrainState) and state.step.ndim == 1 else None
    if n is None:
        raise ValueError("exploit_and_explore needs a stacked TrainState (stack_states), "
                         f"got {type(state).__name__}")
    quantile = _check_args(n, scores, fraction, perturb)
    available = injected_hyperparams(state.opt_state)
    missing = [k for k in explore if k not in available]
    if missing:
        raise ValueError(f"cannot explore {missing}: they are not injected hyperparameters of the optimizer state "
                         f"(found {sorted(available)}); build the optimizer with functrain.optim.inject_hyperparams")
    order = _ranking(scores, greater_is_better)
    top, bottom = order[:quantile], order[n - quantile:]
    gen = torch.Generator().manual_seed(rnglib.seed_of(key))
    sources = torch.arange(n)
    sources[bottom] = top[torch.randint(0, quantile, (quantile,), generator=gen)]
    choices = torch.tensor([float(f) for f in perturb], dtype=torch.float32)
    factors = {}
    for name in explore:
        drawn = choices[torch.randint(0, len(choices), (n,), generator=gen)]
        factors[name] = torch.where(sources != torch.arange(n), drawn, torch.ones(n))

    def take(x):
        return x.index_select(0, sources.to(x.device))

    new_state = state.replace(
        params=tree.map(take, state.params),
        buffers=tree.map(take, state.buffers) if buffers == "stacked" else state.buffers,
        opt_state=_scale_hyperparams(tree.map(take, state.opt_state), factors),
        loss_scale=None if state.loss_scale is None else tree.map(take, state.loss_scale))
    return new_state, PBTDecision(sources, factors)
