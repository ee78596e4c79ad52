"""The Trainer's hooks: Hugging Face semantics over :func:`functrain.runner.run`.

``Trainer.train()`` is ``run(trainer step, state, TrainWindows(loader), steps=max_steps, hooks=...)``
with these hooks, in this order on every event (HF's ``_maybe_log_save_evaluate`` after
``on_step_end`` and after ``on_epoch_end``: log, then evaluate, then save):

    CallbackHook       runner events -> TrainerCallback events (on_train_begin, on_epoch_begin,
                       on_step_begin, on_substep_end / on_pre_optimizer_step / on_optimizer_step,
                       on_step_end, on_epoch_end) and the TrainerState they see (global_step,
                       epoch, data_position); the module points at each new state's tensors
    TrainerLog         the loss summed on the device (``logging_nan_inf_filter``), token, sample
                       and fault counts; read on the host only when ``control.should_log``
    TrainerEvaluate    ``eval_on_start``; ``evaluate()`` when ``control.should_evaluate``,
                       best-metric bookkeeping (``save_strategy="best"``)
    TrainerCheckpoint  resume (the Trainer's checkpoint, its data position mapped to this run);
                       ``checkpoint-N`` in the Trainer's format when ``control.should_save``, and
                       after SIGTERM/SIGINT; then ``on_save``
    ControlFlow        ``should_training_stop`` -> ``run.stop``, ``should_epoch_stop`` ->
                       ``run.end_epoch``; the last of ``num_train_epochs`` ends the run

``on_log`` / ``on_evaluate`` / ``on_save`` / ``on_train_end`` are fired by the Trainer's methods
these hooks call (``log``, ``evaluate``, ``_save_checkpoint``, ``_finish_training``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from functrain.adapters import outputs as hf_outputs
from functrain.io import checkpoint as ck
from functrain.io import run_dir
from functrain.parallel import distributed as fd
from functrain.runner import Hook
from functrain.trainer import compat


class TrainWindows:
    """The Trainer's loader as the runner's data: each pass is one epoch
    (``loader.iter_from(epoch, batch_index)``); the position (``state_dict``) is
    ``TrainerState.data_position``: the loader's, plus the GLOBAL samples consumed in the epoch."""

    def __init__(self, loader, global_window: int):
        self.loader, self.global_window = loader, global_window
        self.epoch, self.start = 0, 0

    def __iter__(self):
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        return iter(self.loader.iter_from(epoch, start))

    def state_dict(self) -> dict:
        return {**self.loader.state.to_dict(), "samples": self.loader.state.batch_index * self.global_window}

    def load_state_dict(self, position: dict) -> None:
        self.epoch, self.start = position["epoch"], position["batch_index"]


def num_rows(batch) -> int:
    rows = hf_outputs.batch_size_of(batch) if isinstance(batch, Mapping) else None
    if rows is not None:
        return rows
    raise TypeError(f"a training batch must be a dict of tensors, got {type(batch).__name__}")


class CallbackHook(Hook):
    """Runner events as TrainerCallback events, with the TrainerState they are given."""

    order = 0

    def __init__(self, trainer, steps_per_epoch: int):
        self.trainer, self.steps_per_epoch = trainer, steps_per_epoch

    def _fire(self, event: str) -> None:
        t = self.trainer
        t.control = getattr(t.callback_handler, event)(t.args, t.state, t.control)

    def on_start(self, run):
        self._fire("on_train_begin")

    def on_epoch_start(self, run):
        self._fire("on_epoch_begin")

    def before_step(self, run):
        self._fire("on_step_begin")

    def on_step(self, run):
        t = self.trainer
        t.train_state = t.callback_handler.train_state = run.state
        t._share_state_with_model()
        microbatches = t._step_for_rows(num_rows(run.batch)).accumulate
        t.control = compat.optimizer_events(t.callback_handler, t.args, t.state, t.control, microbatches)
        t._flos += float(t.floating_point_ops(run.batch))
        t.state.global_step += 1
        t.state.epoch = run.epoch + run.data.loader.state.batch_index / self.steps_per_epoch
        t.state.data_position = run.data.state_dict()
        self._fire("on_step_end")

    def on_epoch_end(self, run):
        # The epoch's end, or a stop inside it: a checkpoint written now resumes where the data
        # really is (the next epoch's start only if this one was read to its end).
        t = self.trainer
        t.state.data_position = run.data.state_dict()
        if not t.control.should_training_stop:
            t.state.epoch = float(run.epoch + 1)
        self._fire("on_epoch_end")


class TrainerLog(Hook):
    """The training logs: summed on the device every step, read on the host on logging steps."""

    order = 10

    def __init__(self, trainer):
        self.trainer = trainer
        self.start_time = time.perf_counter()
        self.start_step = 0
        self.loss_sum = torch.zeros((), dtype=torch.float32)
        self.steps_since_log = self.samples_since_log = self.tokens_since_log = 0
        self.pending_tokens = None  # non-padding tokens counted on the device since the last read
        self.faults = FaultCounters()
        self.timer = time.perf_counter()
        self.last_metrics: dict = {}
        self.total_loss, self.total_samples = torch.zeros(()), 0
        self.train_tokens = 0  # input tokens of this train() call (include_tokens_per_second)

    def on_start(self, run):
        """After the resume: a checkpoint carries the sums of the steps since its last log."""
        t = self.trainer
        pending = t.state.pending_log or {}
        self.loss_sum = torch.tensor(pending.get("loss_sum", 0.0), dtype=torch.float32)
        self.steps_since_log = pending.get("steps", 0)
        self.samples_since_log = pending.get("samples", 0)
        self.tokens_since_log = t.state.num_input_tokens_seen
        self.start_step = t.state.global_step

    def before_step(self, run):
        self._count_tokens(run.batch)  # HF counts the batch's tokens before its step

    def on_step(self, run):
        t, a, metrics = self.trainer, self.trainer.args, run.metrics
        loss = metrics["loss"].detach().float()
        loss = loss.cpu() if loss.device.type == "cpu" else loss
        if a.logging_nan_inf_filter:
            loss = filter_nan_inf(loss, self.loss_sum.to(loss.device), self.steps_since_log)
        self.loss_sum = self.loss_sum.to(loss.device) + loss
        self.total_loss = self.total_loss.to(loss.device) + loss
        self.last_metrics = metrics
        self.faults.add(metrics, t.state.global_step)
        rows = num_rows(run.batch) * fd.world_size()  # global throughput
        self.steps_since_log += 1
        self.samples_since_log += rows
        self.total_samples += rows
        self.maybe_log()

    def on_epoch_end(self, run):
        self.maybe_log()

    def maybe_log(self) -> None:
        if self.trainer.control.should_log and self.steps_since_log > 0:
            self.trainer.log(self.read())

    def read(self) -> dict:
        """The only host reads of the step's metrics: on logging steps."""
        t, m, n = self.trainer, self.last_metrics, self.steps_since_log
        elapsed = time.perf_counter() - self.timer
        logs = {"loss": float(fd.all_reduce_sum(self.loss_sum) / n)}
        for key in ("grad_norm", "learning_rate", "loss_scale"):
            if key in m:
                logs[key] = float(fd.to_local_full(m[key]))
        logs["step_time"] = elapsed / n
        logs.update(t._read_faults())
        self.flush_token_count()
        if elapsed > 0:
            logs["samples_per_second"] = self.samples_since_log / elapsed
            tokens = t.state.num_input_tokens_seen - self.tokens_since_log
            if tokens > 0:
                logs["tokens_per_second"] = tokens / elapsed
        self.tokens_since_log = t.state.num_input_tokens_seen
        self.loss_sum = torch.zeros_like(self.loss_sum)
        self.steps_since_log, self.samples_since_log = 0, 0
        self.timer = time.perf_counter()
        return logs

    def pending_log(self) -> dict:
        """What a checkpoint keeps of the sums since the last log (``TrainerState.pending_log``)."""
        return {"loss_sum": float(self.loss_sum), "steps": self.steps_since_log, "samples": self.samples_since_log}

    def _count_tokens(self, window) -> None:
        t = self.trainer
        if t.args.include_tokens_per_second and isinstance(window, Mapping) and "input_ids" in window:
            self.train_tokens += window["input_ids"].numel() * fd.world_size()  # shape only: no sync
        mode = t.args.include_num_input_tokens_seen
        if mode in (False, "no") or not isinstance(window, Mapping) or "input_ids" not in window:
            return
        if mode == "non_padding" and "attention_mask" in window:
            # Summed as a tensor and read only where the host reads anyway (log, save, end):
            # reading it here would sync every step.
            count = window["attention_mask"].sum()
            self.pending_tokens = count if self.pending_tokens is None else self.pending_tokens + count
        else:
            t.state.num_input_tokens_seen += window["input_ids"].numel()  # shape only: no host sync

    def flush_token_count(self) -> None:
        """Fold the non-padding tokens counted since the last read into the TrainerState."""
        if self.pending_tokens is not None:
            self.trainer.state.num_input_tokens_seen += int(self.pending_tokens)
            self.pending_tokens = None


class TrainerEvaluate(Hook):
    """``evaluate()`` at the start (``eval_on_start``) and when the callbacks ask for it."""

    order = 20

    def __init__(self, trainer, ignore_keys=None):
        self.trainer, self.ignore_keys = trainer, ignore_keys

    def on_start(self, run):
        if self.trainer.args.eval_on_start and run.step == 0:
            self.trainer._evaluate(self.ignore_keys, skip_scheduler=True)

    def on_step(self, run):
        self.maybe_evaluate(run)

    def on_epoch_end(self, run):
        self.maybe_evaluate(run)

    def maybe_evaluate(self, run) -> None:
        t = self.trainer
        if not t.control.should_evaluate:
            return
        metrics = t._evaluate(self.ignore_keys)
        run.state = t.train_state  # reduce_lr_on_plateau observed the metric in the optimizer state
        is_new_best = t._determine_best_metric(metrics)
        if t.args.save_strategy == "best":
            t.control.should_save = is_new_best


class TrainerCheckpoint(Hook):
    """The Trainer's checkpoints: resume before the run, ``checkpoint-N`` when the callbacks ask
    for one and after a signal (the format, rotation, best model and Hub pushes are
    ``Trainer._save_checkpoint``'s)."""

    order = 100

    def __init__(self, trainer, resume: ck.VerifiedCheckpoint | None, loader, claim: dict):
        self.trainer, self.resume, self.loader, self.claim = trainer, resume, loader, claim
        self.resume_path = None if resume is None else resume.path
        self.last_saved: int | None = None

    def restore(self, run):
        t, a = self.trainer, self.trainer.args
        if self.resume is not None:
            max_steps, num_epochs = t.state.max_steps, t.state.num_train_epochs
            run.state = t._load_checkpoint(self.resume, run.state)
            self.resume = None  # its tensors now live in the state
            position = t._resume_position(t.state.data_position or {"epoch": 0, "batch_index": 0}, self.loader)
            t.state.max_steps, t.state.num_train_epochs = max_steps, num_epochs
            t.state.compute_steps(a, max_steps)
            run.step, run.epoch, run.data_position = t.state.global_step, position["epoch"], position
            self.last_saved = run.step
        # Other runs' checkpoints: refused, or deleted with overwrite_output_dir (after every check
        # above, before anything is written).
        run_dir.claim_output_dir(a.output_dir, self.resume_path, a.overwrite_output_dir, act=fd.is_main_process(),
                                 **self.claim)
        fd.barrier()
        t.train_state = t.callback_handler.train_state = run.state
        t._share_state_with_model()
        t.callback_handler.train_dataloader = self.loader
        if fd.is_main_process():
            ck.remove_stale_temporaries(a.output_dir)

    def on_step(self, run):
        self.maybe_save(run)

    def on_epoch_end(self, run):
        self.maybe_save(run)

    def on_end(self, run):
        if run.signal is not None and self.last_saved != run.step:  # SIGTERM: save where it stopped
            self.save(run)

    def maybe_save(self, run) -> None:
        if self.trainer.control.should_save:
            self.save(run)

    def save(self, run) -> None:
        t = self.trainer
        t._save_checkpoint()
        t.control = t.callback_handler.on_save(t.args, t.state, t.control)
        self.last_saved = run.step


class ControlFlow(Hook):
    """TrainerControl's stop flags as the runner's stops (last: every hook of the step had its say)."""

    order = 1000

    def __init__(self, trainer, num_epochs: int):
        self.trainer, self.num_epochs = trainer, num_epochs

    def on_step(self, run):
        if self.trainer.control.should_training_stop:
            run.stop("should_training_stop")
        if self.trainer.control.should_epoch_stop:
            run.end_epoch()

    def on_epoch_end(self, run):
        if self.trainer.control.should_training_stop:
            run.stop("should_training_stop")
        if run.epoch + 1 >= self.num_epochs:
            run.stop("num_train_epochs")


def filter_nan_inf(loss: torch.Tensor, loss_sum: torch.Tensor, steps_since_log: int) -> torch.Tensor:
    """``logging_nan_inf_filter``: a non-finite step loss counts as the mean of the losses logged
    since the last log (transformers' rule), chosen on the device: no host sync."""
    return torch.where(torch.isfinite(loss), loss, loss_sum / (1 + steps_since_log))


class FaultCounters:
    """Per-step counts kept as tensors (no host sync): updates skipped as non-finite, windows with
    no supervised items; read by the Trainer on logging and save steps."""

    def __init__(self):
        self.skipped = self.empty = None
        self.first = None

    def add(self, metrics: dict, step: int) -> None:
        skipped = metrics.get("skipped")
        if skipped is not None and "loss_scale" not in metrics:  # fp16 overflow skips are the loss scaler's
            s = skipped.detach().long()
            at = torch.where(s.bool(), torch.full_like(s, step), torch.full_like(s, -1))
            self.first = at if self.first is None else torch.where(self.first >= 0, self.first, at)
            self.skipped = s if self.skipped is None else self.skipped + s
        items = metrics.get("num_items")
        if items is not None:
            e = (items.detach() == 0).long()
            self.empty = e if self.empty is None else self.empty + e

    def read(self) -> tuple[int, int, int]:
        """``(skipped, first skipped step, empty windows)`` since the last read; resets the counts."""
        skipped = int(self.skipped) if self.skipped is not None else 0
        first = int(self.first) if skipped else -1
        empty = int(self.empty) if self.empty is not None else 0
        self.skipped = self.empty = self.first = None
        return skipped, first, empty
