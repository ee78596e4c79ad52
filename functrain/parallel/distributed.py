"""Past one process (driver side): launch, data-parallel hooks, sharded (FSDP2-style) state.

The pure step stays the same; this module only gives it hooks and reshapes the state:

* **Data parallel** (:func:`data_parallel_hooks`): every rank holds the whole state and computes
  gradients of its shard of the global batch, each already divided by the GLOBAL item count
  (``count_reduce`` all-reduces the count first). ``grad_reduce`` then all-reduces the gradients
  with SUM, so N ranks x B give the gradients of 1 rank x N*B (HF's
  ``average_tokens_across_devices``). Both hooks are functional collectives, so a compiled step
  keeps one graph.
* **Sharded** (:func:`shard_state`, :func:`sharded_hooks`): params and optimizer state are
  ``DTensor`` ``Shard(0)`` in the ``TrainState`` (each rank holds about 1/N). Inside the loss,
  :func:`gather_params` all-gathers each param (``redistribute(Replicate)``) and its backward
  reduce-scatters the gradient with SUM (``grad_placements=[Partial("sum")]``), so gradients come
  back sharded and the optimizer update runs on shards. This is the SimpleFSDP pattern; FSDP2's
  ``fully_shard`` hooks ignore params passed to ``functional_call`` (see DESIGN.md).

Launch helpers (:func:`init_distributed`, :func:`rank`, ...) read the variables ``torchrun`` and
``accelerate launch`` set. See ``docs/distributed.md``.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import json
import os
import time
from collections.abc import Mapping
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from functrain.core import tree

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedLaunchError(RuntimeError):
    """The process was launched with an inconsistent distributed environment."""


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


# -- launch ---------------------------------------------------------------------------------------


def launched_distributed() -> bool:
    """True when ``torchrun`` / ``accelerate launch`` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedLaunchError(f"environment variable {name}={value!r} must be an integer") from None


def read_launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's variables, checked for consistency."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise DistributedLaunchError(f"WORLD_SIZE={world} must be >= 1")
    if world == 1:
        return 0, 1, int(os.environ.get("LOCAL_RANK", "0") or 0)
    missing = [v for v in _LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        raise DistributedLaunchError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
            "launch with `torchrun --nproc_per_node N script.py` or `accelerate launch --num_processes N "
            "script.py`, which set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    r, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= r < world:
        raise DistributedLaunchError(f"RANK={r} is outside [0, WORLD_SIZE={world})")
    if local < 0:
        raise DistributedLaunchError(f"LOCAL_RANK={local} must be >= 0")
    return r, world, local


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT, *,
                     cpu: bool = False) -> DistInfo:
    """Join the process group the launcher describes (no-op for a single process or if done already).

    The set-up is accelerate's ``PartialState`` (as HF's ``TrainingArguments`` does it): it reads
    torchrun / ``accelerate launch`` / MPI / SLURM variables, picks ``nccl`` on CUDA and ``gloo``
    (or ``mpi``) on CPU unless ``backend`` (HF's ``ddp_backend``) says otherwise, sets the CUDA
    device to ``LOCAL_RANK`` and bounds every collective by ``timeout``. ``cpu=True`` (HF's
    ``use_cpu``) keeps every process on the CPU (gloo) even where GPUs are present. Checked first, with a
    :class:`DistributedLaunchError` naming the problem: a misconfigured launch (variables missing,
    more processes per node than GPUs, ``nccl`` without GPUs, an unknown backend). The process
    group is destroyed at interpreter exit, before torch's own teardown.
    """
    if dist.is_available() and dist.is_initialized():
        return current_info()
    _, world, local = read_launch_env()
    if world == 1 and not _mpi_launched():
        return DistInfo(0, 1, local, None, _device_for(local, None))
    _check_backend(backend, local, cpu)
    from accelerate import PartialState

    PartialState(cpu=cpu or not torch.cuda.is_available(), backend=backend, timeout=timeout)
    if dist.is_initialized():
        _keep_until_exit(dist.group.WORLD)
        atexit.register(_destroy_process_group)
    return current_info()


def _mpi_launched() -> bool:
    # mpirun sets these instead of torchrun's variables; accelerate's PartialState reads them.
    return any(int(os.environ.get(v, "1") or "1") > 1 for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))


def _check_backend(backend: str | None, local_rank: int, cpu: bool = False) -> None:
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "xccl", "cpu:gloo,cuda:nccl"):
        raise DistributedLaunchError(f"ddp_backend={backend!r} is not a torch.distributed backend; expected "
                                     "'nccl' (GPUs), 'gloo' (CPU) or 'mpi'")
    if cpu and backend == "nccl":
        raise DistributedLaunchError("backend 'nccl' runs on GPUs but the CPU was asked for (use_cpu=True / "
                                     "ACCELERATE_USE_CPU); use 'gloo' or drop use_cpu")
    if (backend or ("gloo" if cpu else default_backend())) == "nccl":
        if not torch.cuda.is_available():
            raise DistributedLaunchError("backend 'nccl' needs CUDA GPUs, none is available; use 'gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise DistributedLaunchError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): launch at most "
                f"{torch.cuda.device_count()} processes per node (--nproc_per_node / --num_processes)")


def _destroy_process_group() -> None:
    # Shut the groups down while the interpreter is whole (an atexit handler; the user may have
    # done it already), then let gloo's workers finish freeing what their last collectives held.
    if dist.is_available() and dist.is_initialized():
        for group in _live_groups():  # the user's own (dist.new_group) too: none is destroyed later
            _keep_until_exit(group)
        dist.destroy_process_group()
    _wait_for_idle_gloo_workers()


def _live_groups() -> list:
    """Every process group torch has registered (``WORLD`` and each ``new_group``, also those the
    user no longer references). torch keeps them in its private registry ``_world.pg_map`` and
    offers no public listing."""
    from torch.distributed import distributed_c10d

    return list(getattr(getattr(distributed_c10d, "_world", None), "pg_map", {}) or {})


def _wait_for_idle_gloo_workers(timeout: float = 5.0, poll: float = 0.02) -> None:
    """Return once every gloo worker thread sleeps, seen twice in a row (Linux; else at once).

    A worker that completed a collective frees its tensors a moment later; on a loaded machine
    that moment can come after the main thread has started interpreter finalization, too late to
    take the GIL (see :func:`_keep_until_exit`). Each poll sleeps without the GIL, so a worker
    waiting for it runs; a worker not yet scheduled shows as running ("R") and is waited for.
    """
    deadline, idle_polls = time.monotonic() + timeout, 0
    while idle_polls < 2 and time.monotonic() < deadline:
        time.sleep(poll)
        idle_polls = idle_polls + 1 if all(state == "S" for state in _gloo_worker_states()) else 0


def _gloo_worker_states():
    """Scheduler states of this process's gloo worker threads (named ``pt_gloo_runloop``)."""
    tasks = "/proc/self/task"
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else ():
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                if f.read().strip() != "pt_gloo_runloop":
                    continue
            with open(f"{tasks}/{tid}/stat") as f:
                yield f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread ended meanwhile
            continue


def _keep_until_exit(group):
    """Keep a process group's C++ object alive until the process ends, and return the group.

    Why: a gloo group's worker threads hold the last collective they ran (its tensors) until the
    group object is destroyed. When the last reference to the group goes during interpreter
    finalization (a module global, torch's own objects), the workers then free tensors Python
    created, which needs the GIL, which no thread can take any more at that point: CPython ends
    the thread (``pthread_exit``) inside a C++ destructor and the process aborts ("terminate
    called without an active exception"). A group that is never destroyed is harmless: after
    ``destroy_process_group`` (which shuts it down) its threads wait idle until the process ends.
    One reference that nothing releases does that. Groups made by :func:`init_distributed` are
    kept from the start; at exit, every group torch still knows (the user's ``new_group`` ones
    included) is kept before ``destroy_process_group`` drops torch's own references.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))
    return group


def _device_for(local_rank: int, backend: str | None) -> torch.device:
    if backend is not None and "nccl" in backend:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def current_info() -> DistInfo:
    if not is_distributed():
        return DistInfo(0, 1, 0, None, torch.device("cpu"))
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend, _device_for(local, backend))


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that logs, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _own_group(**kwargs):
    return _keep_until_exit(dist.new_group(**kwargs))


class StopAgreement:
    """Every rank stops at the same step when any rank was asked to (SIGTERM to one rank only).

    Each step, :meth:`update` starts an asynchronous all-reduce (MAX) of this rank's request on a
    CPU (gloo) group and reads the previous step's result, which has long arrived: no rank waits,
    no device syncs, and all ranks see the same answer at the same step (one step after the
    request). One process: the local request itself.
    """

    def __init__(self):
        self._group = None
        self._pending = None
        if is_distributed():
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else _own_group(backend="gloo")

    def update(self, requested: bool) -> bool:
        if self._group is None:
            return requested
        agreed = self._finish_pending()
        flag = torch.tensor([int(requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def _finish_pending(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag[0])

    def close(self) -> None:
        """Complete the last all-reduce (every rank calls this at the same point)."""
        self._finish_pending()


# -- data parallel --------------------------------------------------------------------------------


def _group(group):
    return group if group is not None else dist.group.WORLD


def data_parallel_hooks(group=None) -> tuple[Callable, Callable]:
    """``(grad_reduce, count_reduce)`` for :func:`functrain.make_train_step`: SUM all-reduces.

    The step divides each rank's gradients by the global item count (``count_reduce``), so the
    SUM of the ranks' gradients is the gradient of the global batch's mean loss. Functional
    collectives (``torch.distributed._functional_collectives``) trace into a compiled step.
    """
    import torch.distributed._functional_collectives as funcol

    def grad_reduce(grads):
        leaves, treedef = tree.flatten(grads)
        if not leaves:
            return grads
        # One coalesced all-reduce for all gradients (fewer, larger messages).
        return tree.unflatten(treedef, funcol.all_reduce_coalesced(leaves, "sum", _group(group)))

    def count_reduce(count):
        return funcol.all_reduce(count, "sum", _group(group))

    return grad_reduce, count_reduce


def per_rank_mean_hooks(group=None) -> tuple[Callable, Callable]:
    """The naive alternative (for comparison only): normalize by the LOCAL count, average ranks.

    This is what plain DDP with a per-rank mean loss computes; it differs from the global mean
    when ranks hold different numbers of supervised items.
    """
    import torch.distributed._functional_collectives as funcol

    n = world_size()

    def grad_reduce(grads):
        leaves, treedef = tree.flatten(grads)
        summed = funcol.all_reduce_coalesced(leaves, "sum", _group(group))
        return tree.unflatten(treedef, [g / n for g in summed])

    return grad_reduce, None


# Metrics of the step that every rank already holds with the global value.
_GLOBAL_METRICS = frozenset({"num_items", "grad_norm", "learning_rate", "loss_scale", "skipped"})


def reduce_metrics(metrics: Mapping, group=None) -> dict:
    """Metrics of a distributed ``train_step`` as global values, on every rank (plain tensors).

    ``loss`` and the loss_fn's aux entries are each rank's share of the global item-weighted
    mean (weights use the global count), so they are SUMMED. ``num_items`` (after
    ``count_reduce``), ``grad_norm`` (after ``grad_reduce``), ``learning_rate``, ``loss_scale``
    and ``skipped`` are already global and are kept (DTensors are made local).
    """
    out = {k: to_local_full(v) for k, v in metrics.items()}
    if not is_distributed():
        return out
    keys = [k for k, v in out.items() if k not in _GLOBAL_METRICS and isinstance(v, torch.Tensor)]
    if keys:
        stacked = torch.stack([out[k].float() for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        out.update(zip(keys, stacked.unbind(0)))
    return out


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """SUM of ``values`` over ranks (a copy; the input is unchanged). Identity for one process."""
    values = values.detach().clone()
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_gather_json(obj, group=None) -> list:
    """Every rank's ``obj`` (JSON-able), in rank order: sent as JSON text, so nothing received is
    unpickled. ``[obj]`` for one process. A collective: every rank calls it at the same point."""
    if not is_distributed():
        return [obj]
    device = current_info().device
    text = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(text)], dtype=torch.int64, device=device), group=group)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(text)] = text
    texts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world_size())]
    dist.all_gather(texts, padded, group=group)
    return [json.loads(bytes(t[:int(n)].cpu().tolist()).decode("utf-8")) for t, n in zip(texts, sizes)]


def weighted_mean(value: float, weight: float, group=None) -> float:
    """``sum(value_r * weight_r) / sum(weight_r)`` over ranks (e.g. eval loss weighted by items)."""
    t = all_reduce_sum(torch.tensor([value * weight, weight], dtype=torch.float64), group)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


# -- sharded (FSDP2 semantics) --------------------------------------------------------------------


def _dtensor():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    return DTensor, Partial, Replicate, Shard


def is_dtensor(x) -> bool:
    DTensor = _dtensor()[0]
    return isinstance(x, DTensor)


def make_mesh(device_type: str | None = None):
    """A 1-d device mesh over every rank (``cpu`` with gloo, ``cuda`` with nccl)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world_size(),))


def shard_tensor(t: torch.Tensor, mesh):
    """``t`` as a ``DTensor`` sharded on dim 0 (uneven sizes allowed); 0-d tensors stay plain."""
    DTensor, _, _, Shard = _dtensor()
    if isinstance(t, DTensor) or t.ndim == 0:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.detach(), mesh, [Shard(0)])


def shard_state(state, mesh=None):
    """A copy of ``state`` whose params and optimizer state are ``DTensor`` ``Shard(0)``.

    Every rank must hold the same ``state`` (same seed); each keeps about 1/N of each tensor
    (dim 0 not divisible by N gives uneven shards). 0-d tensors (step counts, learning rate) and
    buffers stay plain, replicated tensors.
    """
    mesh = mesh if mesh is not None else make_mesh()
    return state.replace(params=tree.map(lambda t: shard_tensor(t, mesh), state.params),
                         opt_state=tree.map(lambda t: shard_tensor(t, mesh), state.opt_state))


def to_local_full(x):
    """A ``DTensor`` as the full plain tensor (a collective); anything else unchanged."""
    if is_dtensor(x):
        return x.full_tensor()
    return x


def unshard_state(state):
    """A copy of ``state`` with every ``DTensor`` gathered to a full plain tensor (collective)."""
    return tree.map(to_local_full, state)


class MixedPrecision(NamedTuple):
    """FSDP2's ``MixedPrecisionPolicy`` for sharded params: all-gather (and compute) in
    ``param_dtype``, reduce-scatter the gradients in ``reduce_dtype`` (``None``: ``param_dtype``).
    The shards, their gradients and the optimizer state stay in the shards' dtype (fp32)."""
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype | None = None


class _GatherInDtype(torch.autograd.Function):
    """All-gather a ``Shard(0)`` DTensor cast to ``param_dtype``; backward: the gradient cast to
    ``reduce_dtype``, reduce-scattered with SUM, returned in the shard's dtype."""

    @staticmethod
    def forward(ctx, shard, param_dtype, reduce_dtype):
        Replicate = _dtensor()[2]
        ctx.mesh, ctx.placements, ctx.reduce_dtype, ctx.shard_dtype = (shard.device_mesh, shard.placements,
                                                                       reduce_dtype, shard.dtype)
        return shard.to(param_dtype).redistribute(shard.device_mesh, [Replicate()]).to_local()

    @staticmethod
    def backward(ctx, grad):
        DTensor, Partial = _dtensor()[:2]
        partial = DTensor.from_local(grad.to(ctx.reduce_dtype), ctx.mesh, [Partial("sum")], run_check=False)
        return partial.redistribute(ctx.mesh, ctx.placements).to(ctx.shard_dtype), None, None


def gather_param(p, has_items=None, mixed: MixedPrecision | None = None):
    """The full tensor of a ``DTensor`` shard for compute (anything else is returned as is).

    ``to_local(grad_placements=[Partial("sum")])`` makes the backward reduce-scatter the
    gradient with SUM: each rank's gradient is already divided by the global item count, so the
    sum is the gradient of the global mean (``Partial("avg")`` would divide it by N again).
    ``has_items`` False (a microbatch without supervised items) zeroes the gradient before the
    reduce-scatter: where() passes the value through and masks the gradient. ``mixed``: gather in
    its ``param_dtype`` and reduce in its ``reduce_dtype`` (:class:`MixedPrecision`).
    """
    if not is_dtensor(p):
        return p
    _, Partial, Replicate, _ = _dtensor()
    if mixed is not None:
        full = _GatherInDtype.apply(p, mixed.param_dtype, mixed.reduce_dtype or mixed.param_dtype)
    else:
        full = p.redistribute(p.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("sum")])
    if has_items is not None:
        full = torch.where(has_items, full, full.detach())
    return full


def gather_params(params: Mapping, has_items=None, mixed: MixedPrecision | None = None) -> dict:
    """``param_transform`` for sharded mode: every ``DTensor`` param all-gathered before the
    forward (:func:`gather_param`), so the gathered copies live through forward and backward.
    Per unit, where used: :func:`functrain.parallel.fsdp.shard_in_use`.
    """
    return {k: gather_param(p, has_items, mixed) for k, p in params.items()}


def sharded_hooks(group=None) -> dict:
    """Keyword arguments of ``make_train_step`` for sharded mode.

    Gradients are reduce-scattered by :func:`gather_params`' backward, so ``grad_reduce`` is the
    identity; the item count is still all-reduced.
    """
    _, count_reduce = data_parallel_hooks(group)
    return {"param_transform": gather_params, "count_reduce": count_reduce}


def local_nbytes(tree_) -> int:
    """Bytes this rank holds for a pytree (a ``DTensor`` counts its local shard only)."""
    total = 0
    for x in tree.leaves(tree_):
        local = x.to_local() if is_dtensor(x) else x
        total += local.numel() * local.element_size()
    return total
