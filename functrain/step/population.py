"""Populations: N training states stacked into one, trained by ONE vmapped step.

Because a step is a pure function of ``(state, batch)``, ``torch.func.vmap`` can run it over a
stack of N states: N models that differ in initialization seed, dropout stream and any
hyperparameter held as a tensor in the state (learning rate, weight decay, betas, warmup length
via :func:`inject_hyperparams` + :func:`warmup_linear`) train in one batched computation. For
small models this is several times faster than N sequential steps (see ``benchmarks/ensemble.py``).

The per-member computation IS :func:`functrain.step.make_train_step`'s core, built with
``differentiate="func"`` (``torch.func.grad``; ``torch.autograd.grad`` does not compose with
vmap): the same split into microbatches, item counting over the whole window, precision, clipping
and optimizer update, so a member of a population equals an ordinary run (tested to 1e-5).

Two details make the core vmap-able:

* ``torch._foreach_*`` ops (used by the tree helpers and optimizers for speed) have no vmap
  batching rule; the population step runs its own calls of :mod:`functrain.core.foreach` per
  tensor (a thread-local switch: torch's functions are never rebound).
* Randomness: vmap cannot run N differently-seeded generators. The step seeds the global
  generator once from all members' keys and runs vmap with ``randomness="different"``, so each
  member draws its own dropout masks. The result is deterministic (a pure function of the stacked
  state and the batch), but member i's masks are not those a sequential run with key i would
  draw. Runs with dropout off equal sequential runs.

See ``docs/population.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
from torch import nn

from functrain.step import batch as batching
from functrain.core import foreach
from functrain.core import rng as rnglib
from functrain.core import tree
from functrain.core.optim.base import GradientTransformation
from functrain.core.precision import get_policy
from functrain.core.state import TrainState
from functrain.step.train import (
    _learning_rate_scale, _module_mode, find_learning_rate, make_eval_step, make_train_step,
)

__all__ = [
    "PopulationError", "stack_states", "unstack_state", "population_size", "create_population",
    "make_population_train_step", "make_population_eval_step", "warmup_linear", "Dropout", "use_tensor_dropout",
    "dropout_buffers", "float_dropouts",
]


class PopulationError(ValueError):
    """A population that cannot be trained as one vmapped step (shapes differ, unsupported ops)."""


# -- stacking ------------------------------------------------------------------------------------


def stack_states(states: Sequence[TrainState], *, buffers: str = "stacked") -> TrainState:
    """One state whose every tensor leaf is the N members' leaves stacked on a new dim 0.

    ``buffers="shared"``: the members share ONE set of buffers (e.g. the frozen base model under
    N adapters): member 0's buffers are kept as they are, not stacked (no copy), and every member
    must hold those very tensors. Train it with ``make_population_train_step(..., buffers="shared")``.

    The members must share structure (same parameter names, optimizer state layout) and each
    leaf's shape and dtype: a population is one graph. Raises :class:`PopulationError` naming the
    first leaf that differs (e.g. ``params.fc1.weight: (16, 8) in member 0, (32, 8) in member 1``
    for models of different widths).
    """
    states = list(states)
    if not states:
        raise PopulationError("stack_states needs at least one state")
    for i, s in enumerate(states):
        if not isinstance(s, TrainState):
            raise TypeError(f"stack_states: member {i} is a {type(s).__name__}, not a TrainState")
    named = [tree.named_leaves(s) for s in states]
    first = named[0]
    for i, other in enumerate(named[1:], start=1):
        if list(other) != list(first):
            missing = [k for k in first if k not in other][:3]
            extra = [k for k in other if k not in first][:3]
            raise PopulationError(
                f"member {i} has a different state structure than member 0: leaves missing in member {i}: "
                f"{missing}, extra leaves: {extra}. All members need the same model and optimizer")
        for path, a in first.items():
            b = other[path]
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                raise PopulationError(f"leaf {path!r} is not a tensor ({type(a).__name__}); every state leaf "
                                      "must be a tensor to be stacked")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise PopulationError(
                    f"leaf {path!r} differs in shape or dtype: {tuple(a.shape)} {a.dtype} in member 0, "
                    f"{tuple(b.shape)} {b.dtype} in member {i}. A population trains in one graph, so members may "
                    "differ only in tensor values (seeds, hyperparameters held as tensors), not in shapes such "
                    "as model width; train such models separately")
    if _buffer_dim(buffers) is None:
        _check_same_buffers(states)
        shared = states[0].buffers
        stacked = tree.map(lambda *xs: torch.stack(xs), *[s.replace(buffers={}) for s in states])
        return stacked.replace(buffers=shared)
    return tree.map(lambda *xs: torch.stack(xs), *states)


def _buffer_dim(buffers: str):
    if buffers == "shared":
        return None
    if buffers == "stacked":
        return 0
    raise ValueError(f"buffers must be 'stacked' (each member has its own, stacked on dim 0) or 'shared' (one set "
                     f"for all members, e.g. a frozen base model), got {buffers!r}")


def _check_same_buffers(states: Sequence[TrainState]) -> None:
    first = states[0].buffers
    for i, s in enumerate(states[1:], start=1):
        for k, b in first.items():
            other = s.buffers.get(k)
            if other is None or other.data_ptr() != b.data_ptr() or other.shape != b.shape:
                raise PopulationError(
                    f"buffers='shared': member {i}'s buffer {k!r} is not member 0's tensor; shared buffers must be "
                    "the same tensors in every member (build the members over one model with copy=False)")


def population_size(state: TrainState) -> int:
    """N, the size of the leading dim of a stacked state (read from its ``step``)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"expected a stacked TrainState, got {type(state).__name__}")
    if state.step.ndim != 1:
        raise PopulationError(f"this state is not stacked: its step has shape {tuple(state.step.shape)}, "
                              "expected (N,); build one with stack_states")
    return state.step.shape[0]


def unstack_state(state: TrainState, n: int | None = None, *, buffers: str = "stacked") -> list[TrainState]:
    """The N ordinary states of a stacked state (each leaf indexed along dim 0, as views).

    ``buffers="shared"`` (a state from ``stack_states(..., buffers="shared")``): every member gets
    the one set of buffers as it is.
    """
    size = population_size(state)
    if n is not None and n != size:
        raise PopulationError(f"unstack_state: asked for {n} members, the state holds {size}")
    if _buffer_dim(buffers) is None:
        rest = state.replace(buffers={})
        return [tree.map(lambda x, i=i: x[i], rest).replace(buffers=state.buffers) for i in range(size)]
    return [tree.map(lambda x, i=i: x[i], state) for i in range(size)]


def create_population(model_init: Callable[[], nn.Module], tx_factory: Callable[..., GradientTransformation],
                      hyperparams: Sequence[Mapping], *, seeds: Sequence[int] | None = None,
                      loss_scale=None) -> tuple[TrainState, GradientTransformation]:
    """Build N members and stack them: ``(stacked_state, tx)`` for :func:`make_population_train_step`.

    Member i is ``TrainState.create(model_init(), tx_factory(**hyperparams[i]), seed=seeds[i])``
    with ``model_init`` called under ``torch.manual_seed(seeds[i])`` (so seeds also vary the
    initialization; the global RNG is restored afterwards). ``tx_factory`` should be an
    :func:`functrain.optim.inject_hyperparams` factory, so that the hyperparameters are tensors in
    the optimizer state; a hyperparameter that differs between members but is not such a tensor
    is an error (it would be baked into the one graph). The returned ``tx`` is member 0's: with
    injected hyperparameters its update reads every member's values from its own state.
    """
    hyperparams = [dict(h) for h in hyperparams]
    if not hyperparams:
        raise PopulationError("create_population needs at least one member (hyperparams is empty)")
    seeds = list(range(len(hyperparams))) if seeds is None else list(seeds)
    if len(seeds) != len(hyperparams):
        raise PopulationError(f"got {len(seeds)} seeds for {len(hyperparams)} members")
    states, txs = [], []
    for seed, hp in zip(seeds, hyperparams):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_init()
        tx = tx_factory(**hp)
        txs.append(tx)
        states.append(TrainState.create(model, tx, seed=seed, copy=True, loss_scale=loss_scale))
    stacked = stack_states(states)
    check_varying_hyperparams(hyperparams, states[0].opt_state)
    return stacked, txs[0]


def check_varying_hyperparams(hyperparams: list[dict], opt_state) -> None:
    varying = sorted({k for h in hyperparams for k in h if any(h.get(k) != hyperparams[0].get(k) for h in hyperparams)})
    injected = _injected_names(opt_state)
    static = [k for k in varying if k not in injected]
    if static:
        raise PopulationError(
            f"hyperparameter(s) {static} differ between members but are not tensors in the optimizer state "
            f"(injected tensors: {sorted(injected)}); wrap the optimizer factory with "
            "functrain.optim.inject_hyperparams so they live in the state, or keep them equal across members")


def _injected_names(opt_state) -> set:
    names = set()
    for node in _walk(opt_state):
        hp = getattr(node, "hyperparams", None) if isinstance(node, tuple) and hasattr(node, "_fields") else None
        if isinstance(hp, Mapping):
            names.update(hp)
    return names


def _walk(x):
    yield x
    children = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for c in children:
        yield from _walk(c)


# -- hyperparameters as tensors -------------------------------------------------------------------


def warmup_linear(peak, num_warmup_steps, num_training_steps) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF's ``linear`` schedule with every argument allowed to be a 0-d tensor.

    ``functrain.schedules.linear`` bakes its step counts into the graph as Python ints; this one
    reads them from tensors, so a population can vary the warmup length (put
    ``num_warmup_steps`` in an :func:`inject_hyperparams` factory and call this inside it).
    """

    def schedule(count):
        s = torch.as_tensor(count).to(torch.float32)
        w = torch.as_tensor(num_warmup_steps, dtype=torch.float32)
        t = torch.as_tensor(num_training_steps, dtype=torch.float32)
        warm = s / w.clamp_min(1.0)
        decay = ((t - s) / (t - w).clamp_min(1.0)).clamp_min(0.0)
        return peak * torch.where(s < w, warm, decay)

    return schedule


def applied_learning_rate(opt_state) -> torch.Tensor | None:
    """The learning rate the last update applied: the one a schedule state records
    (``ScaleByLearningRateState.learning_rate``), else :func:`find_learning_rate`'s.

    A member's optimizer is ``inject_hyperparams`` of one whose schedule multiplies the member's
    peak: the injected ``learning_rate`` is that peak, the schedule state holds the value used
    (what the ordinary step reports), times any ``reduce_on_plateau`` scale."""
    for node in _walk(opt_state):
        lr = getattr(node, "learning_rate", None) if isinstance(node, tuple) and hasattr(node, "_fields") else None
        if isinstance(lr, torch.Tensor):
            return lr * _learning_rate_scale(opt_state)
    lr = find_learning_rate(opt_state)
    return None if lr is None else lr * _learning_rate_scale(opt_state)


# -- dropout as a tensor hyperparameter -----------------------------------------------------------


class Dropout(nn.Module):
    """``nn.Dropout`` whose probability is a buffer ``p`` (a 0-d tensor), so it is part of each
    member's state and may differ per member of a population (``nn.Dropout`` holds ``p`` as a
    Python float, which one vmapped graph shares). Same masks distribution and scaling as
    ``nn.Dropout``: an element is zeroed with probability ``p``, the others scaled by ``1/(1-p)``;
    ``p=0`` is the identity and ``p=1`` zeros, exactly as ``torch.nn.functional.dropout``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)  # not a weight: not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        scale = torch.where(self.p < 1, 1 / (1 - self.p), torch.zeros_like(self.p)).to(x.dtype)
        return x * keep * scale

    def extra_repr(self) -> str:
        return f"p={float(self.p)}"


def use_tensor_dropout(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` submodule of ``model`` by a :class:`Dropout` with the same
    ``p`` (in place; returns ``model``), so a population can vary it per member. Dropout a model
    applies functionally (``F.dropout(x, p=self.attention_dropout)``, in many transformers
    attention layers) keeps its float ``p``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, Dropout(child.p))
    return model


def dropout_buffers(model: nn.Module) -> list[str]:
    """The state names of the ``p`` buffers of the model's :class:`Dropout` modules."""
    return [f"{name}.p" if name else "p" for name, m in model.named_modules() if isinstance(m, Dropout)]


def float_dropouts(model: nn.Module) -> dict[str, float]:
    """``{module name: p}`` of dropout modules holding ``p`` as a Python float (``nn.Dropout`` & co)."""
    return {name: float(m.p) for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and not isinstance(m, Dropout)}


# -- running the step's core under vmap -----------------------------------------------------------


_VMAP_HINTS = ("vmap", "batching rule", "functorch", "torch.func", "batched tensor", "data-dependent")


def _is_vmap_error(e: Exception) -> bool:
    text = str(e).lower()
    return any(h in text for h in _VMAP_HINTS)



@contextlib.contextmanager
def _explain_vmap_errors(model, done: str, instead: str, members: int | None = None):
    """Re-raise an error of vmap on one of the model's ops as a PopulationError naming the cause
    (``.item()``, a Python branch on a tensor, an op without a batching rule), the line of the
    model's code that does it, and the members (all of them: they run that line in one graph)."""
    try:
        yield
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if not _is_vmap_error(e):
            raise
        where, line = _user_frame(e)
        members = "every member" if members is None else f"members 0..{members - 1}"
        raise PopulationError(
            f"{type(model).__name__} cannot be {done} as a vmapped population: {_vmap_cause(e, line)}"
            f"{f' at {where}: `{line}`' if where else ''}, in the step of {members} (they run this code as one "
            f"graph, so no member can take a branch of its own). torch.func.vmap said: {type(e).__name__}: "
            f"{_shortened(str(e).splitlines()[0])} {instead} (or rewrite the op with tensor ops: torch.where instead of "
            "a Python if, no .item())") from e


def _shortened(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _vmap_cause(e: Exception, line: str) -> str:
    text, code = str(e), line.split("#")[0]
    if ".item()" in code or ".tolist()" in code:
        return "`.item()` reads a member's value on the host (data-dependent)"
    if "data-dependent control flow" in text or "Boolean value of Tensor" in text:
        return "data-dependent control flow (a Python branch or loop on a tensor's value)"
    if "batching rule" in text:
        return "an operation without a vmap batching rule"
    return "an operation vmap cannot batch"


def _user_frame(e: Exception) -> tuple[str | None, str]:
    """``("file.py:42 in forward", "source line")`` of the deepest frame outside torch and functrain."""
    import linecache
    import os
    import traceback

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # functrain/
    skip = (os.path.dirname(torch.__file__), package, "<")
    found = None, ""
    for frame in traceback.extract_tb(e.__traceback__):
        if not frame.filename.startswith(skip) and "contextlib" not in frame.filename:
            line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            found = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}", line
    return found


def _population_key(keys: torch.Tensor) -> torch.Tensor:
    """One key from the N members' keys (a pure function of all of them, read on the CPU)."""
    k = keys[0]
    for other in keys[1:]:
        k = rnglib.fold_in(k, rnglib.seed_of(other))
    return k


def _batch_dims(in_dims) -> object:
    if in_dims in (None, "shared"):
        return None
    if in_dims in (0, "per_member"):
        return 0
    raise ValueError(f"in_dims must be 'shared' (None: every member sees the same batch) or 'per_member' "
                     f"(0: batch tensors have a leading member dim), got {in_dims!r}")


def _validate_batch(batch, batch_dim, n: int, validate: Callable[[Mapping], None]) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    batch = dict(batch)
    if batch_dim is None:
        validate(batch)
        return batch
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"per-member batch: batch[{k!r}] must have a leading dim of size {n} (one batch per "
                             f"member), got {shape}")
    validate({k: v[0] for k, v in batch.items()})  # metadata of one member's batch (views: no copy)
    return batch


def _compile(fn, compile_: bool, compile_kwargs: dict | None):
    if not compile_:
        return fn
    return torch.compile(fn, **{"fullgraph": True, **(compile_kwargs or {})})


def make_population_train_step(
    model: nn.Module,
    tx: GradientTransformation,
    loss_fn=None,
    *,
    in_dims="shared",
    accumulate: int = 1,
    precision: str = "fp32",
    compile: bool = False,  # noqa: A002
    count_items=None,
    max_grad_norm: float | None = None,
    required_keys=None,
    compile_kwargs: dict | None = None,
    buffers: str = "stacked",
):
    """Build ``population_step(stacked_state, batch) -> (stacked_state, metrics)``: one step of all N.

    Args:
        model, tx, loss_fn, accumulate, precision, count_items, max_grad_norm, required_keys:
            as :func:`functrain.make_train_step` (the per-member computation is its core).
        in_dims: ``"shared"`` (every member trains on the same batch) or ``"per_member"`` (each
            batch tensor has a leading dim of size N: member i gets ``batch[k][i]``).
        compile: compile the vmapped step with ``torch.compile(fullgraph=True)``.
        buffers: ``"stacked"`` (each member has its own buffers) or ``"shared"`` (one set for all,
            unbatched under vmap: a frozen base model under N adapters, see
            :func:`functrain.adapters.peft.create_adapter_population`). Ops whose inputs are all
            shared (the base's embeddings of a shared batch) then run once, not N times.

    Metrics are the ordinary step's, each with a leading dim N. The state's ``rng`` keys advance
    as in the ordinary step. Errors: a model whose ops vmap cannot batch raises
    :class:`PopulationError` naming the model (train such members sequentially).
    """
    batch_dim = _batch_dims(in_dims)
    buffer_dim = _buffer_dim(buffers)
    inner = make_train_step(model, tx, loss_fn, accumulate=accumulate, precision=precision, compile=False,
                            count_items=count_items, max_grad_norm=max_grad_norm, required_keys=required_keys,
                            differentiate="func")
    core = inner.pure_core
    needs_loss_scale = get_policy(precision).needs_loss_scale
    user_loss = loss_fn is not None
    required = tuple(required_keys) if required_keys is not None else (() if user_loss else ("labels",))
    forward_keys = None if user_loss else batching.forward_argument_names(model)

    def validate(b):
        batching.validate(b, accumulate=accumulate, required_keys=required, model=model, forward_keys=forward_keys)

    def member_no_scale(params, buffers, opt_state, step, batch):
        params, buffers, opt_state, step, _, metrics = core(params, buffers, opt_state, step, None, batch)
        return params, buffers, opt_state, step, metrics

    def run(params, buffers, opt_state, step, loss_scale, batch):
        if loss_scale is None:
            fn = torch.func.vmap(member_no_scale, in_dims=(0, buffer_dim, 0, 0, batch_dim),
                                 out_dims=(0, buffer_dim, 0, 0, 0), randomness="different")
            p, b, o, s, m = fn(params, buffers, opt_state, step, batch)
            return p, b, o, s, None, m
        # Shared buffers stay unbatched on the way out too (a member updating one is a vmap error).
        fn = torch.func.vmap(core, in_dims=(0, buffer_dim, 0, 0, 0, batch_dim),
                             out_dims=(0, buffer_dim, 0, 0, 0, 0), randomness="different")
        return fn(params, buffers, opt_state, step, loss_scale, batch)

    compiled = _compile(run, compile, compile_kwargs)

    def population_step(state: TrainState, batch: Mapping):
        n = population_size(state)
        batch = _validate_batch(batch, batch_dim, n, validate)
        loss_scale = state.loss_scale
        if needs_loss_scale and loss_scale is None:
            raise PopulationError("precision='fp16' needs a stacked loss scale: pass loss_scale="
                                  "functrain.precision.dynamic_scale_init() to each member before stacking")
        with _explain_vmap_errors(model, "trained", "Train the members sequentially with functrain.make_train_step",
                                  members=n), \
                rnglib.seeded(_population_key(state.rng)), _module_mode(model, training=True), foreach.per_tensor():
            params, buffers, opt_state, step, loss_scale, metrics = compiled(
                state.params, state.buffers, state.opt_state, state.step, loss_scale, batch)
        new_state = state.replace(params=params, buffers={**state.buffers, **buffers}, opt_state=opt_state, step=step,
                                  loss_scale=loss_scale, rng=rnglib.next_key(state.rng))
        if "learning_rate" in metrics:
            metrics = {**metrics, "learning_rate": applied_learning_rate(opt_state)}
        return new_state, metrics

    population_step.member_step = inner  # the ordinary step the members follow (differentiate="func")
    return population_step


def make_population_eval_step(
    model: nn.Module,
    loss_fn=None,
    *,
    in_dims="shared",
    precision: str = "fp32",
    compile: bool = False,  # noqa: A002
    count_items=None,
    return_outputs: bool = False,
    required_keys=None,
    compile_kwargs: dict | None = None,
    buffers: str = "stacked",
):
    """Build ``population_eval_step(stacked_state, batch) -> dict``: every member evaluated at once.

    Same results as :func:`functrain.make_eval_step` per member, each entry with a leading dim N
    (``loss``, ``num_items``, and ``outputs`` when ``return_outputs`` and the outputs are tensors).
    ``buffers`` as in :func:`make_population_train_step`.
    """
    batch_dim = _batch_dims(in_dims)
    buffer_dim = _buffer_dim(buffers)
    inner = make_eval_step(model, loss_fn, precision=precision, compile=False, count_items=count_items,
                           return_outputs=return_outputs, required_keys=required_keys)
    core = inner.pure_core
    required = tuple(required_keys) if required_keys is not None else ()
    forward_keys = None if loss_fn is not None else batching.forward_argument_names(model)

    def validate(b):
        batching.validate(b, accumulate=1, required_keys=required, model=model, forward_keys=forward_keys)

    def member(params, buffers, batch):
        out = core(params, buffers, batch)
        return {k: v for k, v in out.items() if v is not None}

    def run(params, buffers, batch):
        return torch.func.vmap(member, in_dims=(0, buffer_dim, batch_dim), randomness="different")(params, buffers, batch)

    compiled = _compile(run, compile, compile_kwargs)

    def population_eval_step(state: TrainState, batch: Mapping):
        n = population_size(state)
        batch = _validate_batch(batch, batch_dim, n, validate)
        with _explain_vmap_errors(model, "evaluated", "Evaluate the members one by one with functrain.make_eval_step",
                                  members=n), \
                rnglib.seeded(_population_key(state.rng)), _module_mode(model, training=False), foreach.per_tensor():
            return compiled(state.params, state.buffers, batch)

    return population_eval_step
