"""PopulationTrainer's training loop: :func:`functrain.runner.run` with one hook speaking HF's callbacks.

The runner steps the stacked state; :class:`PopulationLoop` is the hook that does everything a
population adds around the steps, in HF's order: the runner's ``on_epoch_start`` / ``before_step``
/ ``on_step`` / ``on_epoch_end`` are HF's ``on_epoch_begin`` / ``on_step_begin`` /
``on_step_end`` / ``on_epoch_end``, each followed by what the :class:`TrainerControl` flags ask
for (log, evaluate, PBT round, save; HF's ``_maybe_log_save_evaluate``), then
``should_training_stop`` -> ``run.stop``, ``should_epoch_stop`` -> ``run.end_epoch`` (also a stop
when every member stopped early).

Metrics reach the callbacks as one flat dict per event (``on_log``'s ``logs``, ``on_evaluate``'s
``metrics``): HF's key (``loss``, ``eval_loss``, ...) holds the mean over the members, and
``member_{i}/{key}`` member i's value (:func:`member_metrics`). ``kwargs["train_state"]`` is the
stacked state (a leading member dim on every leaf).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from functrain.adapters.outputs import batch_size_of
from functrain.core import tree
from functrain.runner import Hook, run
from functrain.trainer import compat
from functrain.trainer.callbacks import (
    CallbackHandler, DefaultFlowCallback, EarlyStoppingCallback, ExportableState, TrainerCallback, TrainerState,
)

def member_metrics(rows: list[dict]) -> dict:
    """``[{"loss": a}, {"loss": b}]`` -> ``{"loss": (a + b) / 2, "member_0/loss": a, "member_1/loss": b}``.

    HF's names hold the population mean (what a progress bar or tracker callback reads), and
    ``member_{i}/{name}`` each member's value (numbers only)."""
    names = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    flat = {k: sum(float(r[k]) for r in rows) / len(rows) for k in names}
    flat.update({f"member_{i}/{k}": float(r[k]) for i, r in enumerate(rows) for k in names})
    return flat


def callback_handler(trainer, callbacks) -> tuple[CallbackHandler, EarlyStoppingCallback | None]:
    """HF's DefaultFlowCallback (the logging/eval/save cadences) then the given callbacks; an
    EarlyStoppingCallback among them is taken out and returned (it applies per member)."""
    callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, TrainerCallback):
            raise TypeError(f"callbacks[{i}] is a {type(cb).__name__}, not a TrainerCallback (an instance or class)")
    stopping = [cb for cb in callbacks if isinstance(cb, EarlyStoppingCallback)]
    if len(stopping) > 1:
        raise ValueError("callbacks hold more than one EarlyStoppingCallback; a population applies one rule per member")
    handler = CallbackHandler([DefaultFlowCallback(), *[cb for cb in callbacks if cb not in stopping]],
                              model=trainer.model, processing_class=trainer.processing_class)
    return handler, (stopping[0] if stopping else None)


def _keep_stopped(new_state, old_state, active: torch.Tensor, buffers: str):
    """``new_state`` for the active members, ``old_state`` for the stopped ones (leaf-wise select;
    shared buffers are not per member and stay as they are)."""
    def pick(new, old):
        mask = active.to(new.device).view(-1, *([1] * (new.ndim - 1)))
        return torch.where(mask, new, old)

    if buffers == "shared":
        kept = tree.map(pick, new_state.replace(buffers={}), old_state.replace(buffers={}))
        return kept.replace(buffers=new_state.buffers)
    return tree.map(pick, new_state, old_state)


class _Batches:
    """The train loader as the runner's data: one pass per epoch (``loader.iter_from``), resumed
    at a saved ``{"epoch", "batch_index"}`` (``state_dict`` / ``load_state_dict``); a position at
    an epoch's end resumes at the next epoch's start (no empty pass, so no empty epoch events)."""

    def __init__(self, loader, steps_per_epoch: int):
        self.loader, self.steps_per_epoch, self.start = loader, steps_per_epoch, (0, 0)

    def state_dict(self) -> dict:
        s = self.loader.state
        return {"epoch": int(s.epoch), "batch_index": int(s.batch_index)}

    def load_state_dict(self, position: dict) -> None:
        epoch, index = int(position["epoch"]), int(position["batch_index"])
        self.start = (epoch + 1, 0) if index >= self.steps_per_epoch else (epoch, index)

    def __iter__(self):
        # A generator: the position moves when the pass is read, not when iter() is merely called.
        epoch, index = self.start
        self.start = (epoch + 1, 0)  # where the next pass starts, however this one ends
        yield from self.loader.iter_from(epoch, index)


class PopulationLoop(Hook):
    """The one hook of a population run (see the module docstring). ``acc`` holds the driver's
    per-member tensors (loss sums, early-stopping state); it is saved with the checkpoints."""

    def __init__(self, pop, loader, steps_per_epoch: int, max_steps: int, tx, resume_path: str | None):
        a, n = pop.trainer.args, len(pop.members)
        self.pop, self.loader, self.tx, self.resume_path = pop, loader, tx, resume_path
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.handler, self.control = pop.callback_handler, pop.control
        self.handler.train_dataloader = loader
        self.acc = {"total": torch.zeros(n), "since_log": torch.zeros(n),
                    "logged_at": torch.zeros((), dtype=torch.int64), "active": torch.ones(n, dtype=torch.bool),
                    "best": torch.full((n,), math.nan), "patience": torch.zeros(n, dtype=torch.int64)}
        self.state = TrainerState(max_steps=max_steps, num_train_epochs=math.ceil(max_steps / steps_per_epoch),
                                  train_batch_size=a.per_device_train_batch_size)
        self.state.compute_steps(a, max_steps)
        self.accumulate = a.gradient_accumulation_steps
        self.last_saved = None
        self._steps = {}
        self.samples, self.started, self.start_step = 0, time.perf_counter(), 0

    # -- the step the runner calls ------------------------------------------------------------
    def step(self, state, window):
        self.accumulate = self.pop._accumulation(window)
        self.samples += batch_size_of(window)
        new_state, metrics = self.pop._step(self._steps, self.tx, state, window, self.accumulate)
        if not bool(self.acc["active"].all()):
            new_state = _keep_stopped(new_state, state, self.acc["active"], self.pop._buffers)
        return new_state, metrics

    # -- runner events ------------------------------------------------------------------------
    def restore(self, r):
        if self.resume_path is None:
            self.pop.log_history, self.pop.pbt_schedule = [], []
            return
        r.state, self.acc, r.step, meta = self.pop._load_checkpoint(self.resume_path, r.state, self.acc)
        r.data_position = meta.get("data_position") or dict(zip(("epoch", "batch_index"),
                                                                divmod(r.step, self.steps_per_epoch)))
        epoch, index = int(r.data_position["epoch"]), int(r.data_position["batch_index"])
        r.epoch = epoch + 1 if index >= self.steps_per_epoch else epoch  # as _Batches resumes
        known = {f.name for f in dataclasses.fields(TrainerState)}
        saved = {k: v for k, v in meta.get("trainer_state", {}).items() if k in known}
        self.state = dataclasses.replace(self.state, **{k: v for k, v in saved.items()
                                                        if k not in ("max_steps", "num_train_epochs")})
        compat.restore_callbacks(self.handler, self.state.stateful_callbacks, rebuild=False)
        self.last_saved = r.step

    def on_start(self, r):
        self.pop._rewrite_logs()  # the files hold exactly this run's entries (those restored on resume)
        self.state.global_step = self.start_step = r.step
        self.started = time.perf_counter()
        self.handler.train_state = r.state
        self.control = self.handler.on_train_begin(self.pop.trainer.args, self.state, self.control)

    def on_epoch_start(self, r):
        self.control = self.handler.on_epoch_begin(self.pop.trainer.args, self.state, self.control)

    def before_step(self, r):
        self.control = self.handler.on_step_begin(self.pop.trainer.args, self.state, self.control)

    def on_step(self, r):
        a, acc = self.pop.trainer.args, self.acc
        self.handler.train_state = r.state
        self.control = compat.optimizer_events(self.handler, a, self.state, self.control, self.accumulate)
        acc["total"] = acc["total"] + r.metrics["loss"]
        acc["since_log"] = acc["since_log"] + r.metrics["loss"]
        self.state.global_step = r.step
        position = self.loader.state
        self.state.epoch = position.epoch + position.batch_index / self.steps_per_epoch
        self.control = self.handler.on_step_end(a, self.state, self.control)
        self._log_evaluate_save(r, pbt_round=True)
        self._follow_stop_flags(r)

    def on_epoch_end(self, r):
        self.control = self.handler.on_epoch_end(self.pop.trainer.args, self.state, self.control)
        self._log_evaluate_save(r, pbt_round=False)
        self._follow_stop_flags(r)

    def _follow_stop_flags(self, r):
        if self.control.should_training_stop:
            r.stop("should_training_stop")
        elif not bool(self.acc["active"].any()):
            r.stop("every member stopped early")
        elif self.control.should_epoch_stop:
            r.end_epoch()

    def on_end(self, r):
        if r.signal is not None and self.last_saved != r.step:
            self._save(r)  # SIGTERM / Ctrl-C: save, so train(resume_from_checkpoint=True) continues
        self._log(self._summary(r))
        self.control = self.handler.on_train_end(self.pop.trainer.args, self.state, self.control)
        self.pop._close_writers()

    # -- what the flags ask for ---------------------------------------------------------------
    def _log_evaluate_save(self, r, pbt_round: bool):
        """HF's ``_maybe_log_save_evaluate``: log, evaluate, save as the flags say; a PBT round
        (on its own ``pbt_interval``) between the evaluation and the save."""
        pop, a, done = self.pop, self.pop.trainer.args, r.step
        if self.control.should_log:
            since = self.acc["since_log"] / max(done - int(self.acc["logged_at"]), 1)
            rows = pop._log_members(done, since, r.metrics)
            self.acc = {**self.acc, "since_log": torch.zeros_like(since), "logged_at": torch.tensor(done)}
            self._log(member_metrics(rows))
        pbt_due = pbt_round and bool(pop.pbt_interval) and done % pop.pbt_interval == 0 and done < self.max_steps
        evaluate = self.control.should_evaluate
        results = pop._evaluate_state(r.state, on_batch=self._prediction_step) if evaluate or pbt_due else None
        if evaluate:
            pop._log_rows(done, results)
            if pop.early_stopping_patience is not None:
                self.acc = pop._update_stopping(self.acc, results)
            metrics = member_metrics(results)
            self._log(metrics)
            self.control = self.handler.on_evaluate(a, self.state, self.control, metrics=metrics)
        if pbt_due:
            r.state, self.acc = pop._pbt_round(r.state, done, results, self.acc)
        if self.control.should_save:
            self._save(r)

    def _prediction_step(self) -> None:
        self.control = self.handler.on_prediction_step(self.pop.trainer.args, self.state, self.control)

    def _summary(self, r) -> dict:
        """HF's last log of a run: runtime, throughput, ``train_loss`` (mean and per member)."""
        runtime, steps = time.perf_counter() - self.started, r.step - self.start_step
        losses = (self.acc["total"] / max(r.step, 1)).tolist()
        return {"train_runtime": round(runtime, 4),
                "train_samples_per_second": round(self.samples / runtime, 3) if runtime > 0 else 0.0,
                "train_steps_per_second": round(steps / runtime, 3) if runtime > 0 else 0.0,
                "total_flos": self.state.total_flos, **member_metrics([{"train_loss": x} for x in losses])}

    def _log(self, logs: dict) -> None:
        """HF's ``Trainer.log``: ``epoch`` added, the entry kept in ``state.log_history`` with its step."""
        logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.handler.on_log(self.pop.trainer.args, self.state, self.control, logs)

    def _save(self, r) -> None:
        self.state.stateful_callbacks = {type(cb).__name__: cb.state() for cb in self.handler.callbacks
                                         if isinstance(cb, ExportableState)}
        extra = {"data_position": r.data.state_dict(), "trainer_state": dataclasses.asdict(self.state)}
        self.pop._save_checkpoint(r.state, self.acc, r.step, extra)
        self.last_saved = r.step
        self.control = self.handler.on_save(self.pop.trainer.args, self.state, self.control)


def train(pop, loader, steps_per_epoch: int, max_steps: int, state, tx, resume_path: str | None):
    """Run the population: ``(final stacked state, PopulationLoop)``."""
    loop = PopulationLoop(pop, loader, steps_per_epoch, max_steps, tx, resume_path)
    r = run(loop.step, state, _Batches(loader, steps_per_epoch), steps=max_steps, hooks=[loop])
    return r.state, loop


__all__ = ["PopulationLoop", "callback_handler", "member_metrics", "train"]
