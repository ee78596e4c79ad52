"""Hooks for :func:`functrain.runner.run`: small objects the loop calls at fixed points.

Compose them in a list; each does one thing:

    Log(every)             read the step's metrics every N steps (the only per-step host read)
                           and send them to the writers below via ``run.log``
    Jsonl(path), TensorBoard(logdir), Print(), ProgressBar()   writers: where logs go
    Evaluate(every, eval_step, data)   an eval pass every N steps, logged as ``eval_*``
    Checkpoint(dir, every)  atomic checksummed checkpoints; resumes from the newest valid one
    StopWhen(condition)     end the run when ``condition(run)`` holds
    Profile(logdir)         torch.profiler over a few steps
    every(n, fn)            any function ``fn(run)`` every N steps

A hook with state that must survive a resume (a best metric, a patience counter) returns it from
``state_dict()`` as JSON-able values; the checkpoint stores it and ``load_state_dict`` gets it back.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import torch

from functrain.core import tree
from functrain.io import checkpoint as ck
from functrain.parallel import distributed as fd
from functrain.runner.loop import Run, data_position, scalars


class Hook:
    """Base class: override the events you need. ``on_step`` runs when ``run.step % every == 0``;
    hooks run by ascending ``order``, then in the order given."""

    every: int = 1
    order: int = 0

    def restore(self, run: Run) -> None:
        """Before the run starts: load saved progress into ``run`` (the checkpoint hook does)."""

    def on_start(self, run: Run) -> None:
        pass

    def on_epoch_start(self, run: Run) -> None:
        pass

    def before_step(self, run: Run) -> None:
        """``run.batch`` is the batch the next step gets."""

    def on_step(self, run: Run) -> None:
        pass

    def on_epoch_end(self, run: Run) -> None:
        pass

    def on_log(self, run: Run, logs: dict) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _positive(every, what: str) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{what}: every must be an int >= 1 (a number of steps), got {every!r}")
    return every


class every(Hook):  # noqa: N801 - reads as a function: every(100, fn)
    """``fn(run)`` every ``n`` steps (Levanter's ``add_hook(fn, every=n)``)."""

    def __init__(self, n: int, fn: Callable[[Run], None]):
        self.every, self.fn = _positive(n, "every(n, fn)"), fn

    def on_step(self, run):
        self.fn(run)


# -- logging -----------------------------------------------------------------------------------------


class Log(Hook):
    """Every ``every`` steps, read the step's 0-d metrics as floats and ``run.log`` them, with
    ``step_time`` (seconds per step since the last log).

    ``reduce``: applied to the metric tensors first, on every process; default
    :func:`functrain.distributed.reduce_metrics` (global values for a data-parallel
    ``make_train_step``; the identity for one process).
    """

    def __init__(self, every: int = 10, *, reduce: Callable | None = None):
        self.every = _positive(every, "Log")
        self.reduce = reduce or fd.reduce_metrics
        self._since = None

    def on_start(self, run):
        self._since = (run.step, time.perf_counter())

    def on_step(self, run):
        logs = {k: float(v) for k, v in self.reduce(scalars(run.metrics)).items()}
        last_step, last_time = self._since
        self._since = (run.step, time.perf_counter())
        logs["step_time"] = (self._since[1] - last_time) / max(run.step - last_step, 1)
        run.log(logs)


def _jsonable(v):
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN / inf


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the lines of a JSONL log written after ``step`` (by a run that was then resumed), and a
    last line cut short by a crash, so the file reads as one uninterrupted history."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


class Jsonl(Hook):
    """Append every log as one JSON line ``{"step": N, ...}`` to ``path`` (main process only)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def on_start(self, run):
        if run.is_main_process:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            truncate_jsonl(self.path, run.step)

    def on_log(self, run, logs):
        if run.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": run.step, **{k: _jsonable(v) for k, v in logs.items()}}) + "\n")


def tensorboard_tag(key: str) -> str:
    """HF's TensorBoard tags: ``eval_loss`` -> ``eval/loss``, ``test_x`` -> ``test/x``, else ``train/key``."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


class TensorBoard(Hook):
    """Scalars to TensorBoard event files in ``logdir`` (main process only)."""

    order = 90  # closes after the other hooks' last logs (an Evaluate at the end)

    def __init__(self, logdir: str):
        self.logdir, self.writer = os.fspath(logdir), None

    def on_log(self, run, logs):
        if not run.is_main_process:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.logdir, purge_step=run.step or None)
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(tensorboard_tag(k), v, run.step)
        self.writer.flush()

    def on_end(self, run):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Print(Hook):
    """Print every log on one line: ``step 100: loss 2.3100 grad_norm 0.8700``."""

    def on_log(self, run, logs):
        if run.is_main_process:
            print(f"step {run.step}: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in logs.items()), flush=True)


class ProgressBar(Hook):
    """A tqdm bar over the run's steps (main process only), showing the latest logs."""

    order = 90  # closes after the other hooks' last logs

    def __init__(self, **tqdm_kwargs):
        self.kwargs, self.bar = tqdm_kwargs, None

    def on_start(self, run):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.steps, initial=run.step, disable=not run.is_main_process, **self.kwargs)

    def on_step(self, run):
        self.bar.update(1)

    def on_log(self, run, logs):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)}, refresh=False)

    def on_end(self, run):
        if self.bar is not None:
            self.bar.close()


# -- evaluation --------------------------------------------------------------------------------------


class Evaluate(Hook):
    """Every ``every`` steps (and at the end when ``at_end``), run ``eval_step(state, batch) ->
    metrics`` over ``data`` and log ``{prefix}_{name}``: each 0-d metric's mean over the batches,
    weighted by the batch's ``num_items`` when it reports one (as :func:`functrain.make_eval_step`
    does), across processes too. The results are also kept in ``run.eval_metrics``.

    ``data`` is iterated afresh each time (a list, a non-shuffling loader; in a distributed run,
    each process's share).
    """

    def __init__(self, every: int, eval_step: Callable, data, *, prefix: str = "eval", at_end: bool = False):
        self.every, self.eval_step, self.data = _positive(every, "Evaluate"), eval_step, data
        self.prefix, self.at_end = prefix, at_end
        self._last = None

    def on_step(self, run):
        self.evaluate(run)

    def on_end(self, run):
        if self.at_end and self._last != run.step:
            self.evaluate(run)

    def evaluate(self, run: Run) -> dict:
        sums: dict = {}
        for batch in self.data:
            m = scalars(self.eval_step(run.state, batch))
            weight = m.pop("num_items", None)
            weight = torch.ones(()) if weight is None else weight.detach().double().cpu()
            for k, v in m.items():
                s = sums.setdefault(k, [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)])
                # A batch without items (every label ignored) has a NaN mean and weight 0: it adds nothing.
                s[0] += torch.where(weight > 0, v.detach().double().cpu() * weight, 0.0)
                s[1] += weight
        names = sorted(sums)
        totals = fd.all_reduce_sum(torch.stack([torch.stack(sums[k]) for k in names])) if names else []
        results = {f"{self.prefix}_{k}": float(t[0] / t[1]) for k, t in zip(names, totals)}
        self._last = run.step
        run.eval_metrics = results
        run.log(results)
        return results


# -- stopping and profiling ---------------------------------------------------------------------------


class StopWhen(Hook):
    """End the run (after checkpointing in ``on_end``) when ``condition(run)`` is true, checked
    every ``every`` steps (reading a metric syncs the device: check sparingly)."""

    def __init__(self, condition: Callable[[Run], bool], every: int = 1, reason: str = "stop condition"):
        self.condition, self.every, self.reason = condition, _positive(every, "StopWhen"), reason

    def on_step(self, run):
        if self.condition(run):
            run.stop(self.reason)


class Profile(Hook):
    """``torch.profiler`` over steps ``start+1 .. start+steps``; the trace (Chrome/Perfetto JSON,
    also read by TensorBoard's profiler plugin) is written to ``logdir`` on the main process."""

    def __init__(self, logdir: str, *, start: int = 5, steps: int = 3, **profile_kwargs):
        self.logdir, self.start, self.steps, self.kwargs = os.fspath(logdir), start, steps, profile_kwargs
        self.profiler, self.path = None, None

    def on_step(self, run):
        if run.step == self.start and self.profiler is None:
            self.profiler = torch.profiler.profile(**self.kwargs)
            self.profiler.__enter__()
        elif self.profiler is not None and run.step >= self.start + self.steps:
            self._finish(run)

    def on_end(self, run):
        if self.profiler is not None:
            self._finish(run)

    def _finish(self, run):
        self.profiler.__exit__(None, None, None)
        if run.is_main_process:
            os.makedirs(self.logdir, exist_ok=True)
            self.path = os.path.join(self.logdir, f"trace_steps_{self.start + 1}-{run.step}.json")
            self.profiler.export_chrome_trace(self.path)
        self.profiler = None


# -- checkpoints --------------------------------------------------------------------------------------


class Checkpoint(Hook):
    """Write ``output_dir/checkpoint-{step}`` every ``every`` steps and at the end of the run
    (also after SIGTERM), keeping the newest ``keep``; resume from the newest valid one.

    The format is :mod:`functrain.io.checkpoint`'s (atomic, checksummed manifest, safetensors + JSON,
    no pickle): every leaf of the state pytree keyed by its path, the global generators, and
    ``trainer_state.json`` with ``global_step``, ``data_position`` and the hooks' states
    (``stateful_callbacks``, as HF names it). Every rng key lives in the state, so a resumed run
    is bitwise the uninterrupted one. The state must hold tensors only (scalars as 0-d tensors),
    replicated on every process (data parallel); sharded ``DTensor`` states are refused.
    """

    order = 100  # after every other hook of the step: their states at this step are saved

    def __init__(self, output_dir: str, every: int, *, keep: int | None = None, resume: bool = True):
        self.output_dir, self.every = os.fspath(output_dir), _positive(every, "Checkpoint")
        self.keep, self.resume = keep, resume
        self.last_saved: int | None = None
        self.resumed_from: str | None = None

    def restore(self, run):
        _check_savable(run.state)
        if run.is_main_process:
            ck.remove_stale_temporaries(self.output_dir)
        fd.barrier()
        found = ck.read_resumable_checkpoint(self.output_dir) if self.resume else None
        if found is None:
            return
        path = found.path
        run.state, progress = ck.load_tree(found, run.state)  # from the bytes verified, read once
        run.step, run.data_position = int(progress["global_step"]), progress.get("data_position")
        run.epoch = int(progress.get("epoch", 0))
        saved = progress.get("stateful_callbacks", {})
        for name, hook in _named_hooks(run.hooks).items():
            if name in saved:
                hook.load_state_dict(saved[name])
        self.resumed_from, self.last_saved = path, run.step

    def on_step(self, run):
        self.save(run)

    def on_end(self, run):
        if self.last_saved != run.step:
            self.save(run)
        ck.wait_durable()  # the run (or its SIGTERM stop) ends with every checkpoint fsynced

    def save(self, run: Run) -> str:
        progress = {"global_step": run.step, "epoch": run.epoch, "data_position": data_position(run.data),
                    "stateful_callbacks": {n: h.state_dict() for n, h in _named_hooks(run.hooks).items()}}
        path = ck.checkpoint_path(self.output_dir, run.step)
        if run.is_main_process:  # every process holds the same state: one writer
            ck.save_tree_checkpoint(self.output_dir, run.step, run.state, progress)
            ck.rotate_checkpoints(self.output_dir, self.keep)
        fd.barrier()  # no process runs ahead (or resumes) before the checkpoint is complete
        self.last_saved = run.step
        return path


def _named_hooks(hooks) -> dict:
    """``{name: hook}`` by class name, ``Name#2`` for a second one of a class (stable across runs)."""
    named, seen = {}, {}
    for h in hooks:
        base = type(h).__name__
        seen[base] = seen.get(base, 0) + 1
        named[base if seen[base] == 1 else f"{base}#{seen[base]}"] = h
    return named


def _check_savable(state) -> None:
    for path, leaf in tree.named_leaves(state).items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"Checkpoint: state leaf {path!r} is a {type(leaf).__name__}; a checkpointed state "
                            "holds tensors only (keep counters and scalars as 0-d tensors)")
        if fd.is_dtensor(leaf):
            raise TypeError(f"Checkpoint: state leaf {path!r} is a sharded DTensor; the runner checkpoints "
                            "replicated (data-parallel) states. Gather it (functrain.distributed.unshard_state) "
                            "or train sharded models with the Trainer (fsdp='full_shard')")
