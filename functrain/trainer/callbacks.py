"""Callbacks with the Hugging Face events, TrainerState, TrainerControl and the default flow.

Callbacks observe training; they steer it only through :class:`TrainerControl` flags. They get
``(args, state, control, **kwargs)`` like in transformers, where kwargs holds ``model`` (the user's
module), ``train_state`` (the pure :class:`functrain.TrainState`, read-only), ``processing_class``,
``train_dataloader``, ``eval_dataloader`` and, for some events, ``metrics`` or ``logs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("functrain")


@dataclass
class TrainerState:
    """The driver's bookkeeping, saved as ``trainer_state.json`` in each checkpoint.

    HF fields (``global_step``, ``epoch``, ``log_history``, ``best_metric``, ...) plus the exact
    position in the data (``data_position``) and the fp16 loss scale, for exact resume.
    """

    epoch: float = 0.0  # as transformers 5 (callbacks read it before training starts)
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict | None = None
    stateful_callbacks: dict = field(default_factory=dict)
    data_position: dict | None = None
    loss_scale: float | None = None
    # Updates skipped because the loss or the gradients were NaN/Inf (non_finite_policy).
    nonfinite_updates_skipped: int = 0
    # The training loss summed since the last log and its step count, so the first log after a
    # resume averages over the same steps as an uninterrupted run.
    pending_log: dict | None = None

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def load_from_json(cls, path: str) -> "TrainerState":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def compute_steps(self, args, max_steps: int) -> None:
        """Resolve ratio-valued ``logging/eval/save_steps`` (floats < 1) against ``max_steps``."""
        for name in ("logging", "eval", "save"):
            v = getattr(args, f"{name}_steps")
            if v is None:
                continue
            setattr(self, f"{name}_steps", math.ceil(max_steps * v) if v < 1 else int(v))


@dataclass
class TrainerControl:
    """Flags callbacks set to ask the driver to log, evaluate, save or stop."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self):
        self.should_training_stop = False

    def _new_epoch(self):
        self.should_epoch_stop = False

    def _new_step(self):
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}


class TrainerCallback:
    """Base class: override the events you need. Returning a TrainerControl replaces the flags."""

    def on_init_end(self, args, state, control, **kwargs): pass
    def on_train_begin(self, args, state, control, **kwargs): pass
    def on_train_end(self, args, state, control, **kwargs): pass
    def on_epoch_begin(self, args, state, control, **kwargs): pass
    def on_epoch_end(self, args, state, control, **kwargs): pass
    def on_step_begin(self, args, state, control, **kwargs): pass
    def on_pre_optimizer_step(self, args, state, control, **kwargs): pass
    def on_optimizer_step(self, args, state, control, **kwargs): pass
    def on_substep_end(self, args, state, control, **kwargs): pass
    def on_step_end(self, args, state, control, **kwargs): pass
    def on_evaluate(self, args, state, control, **kwargs): pass
    def on_predict(self, args, state, control, metrics, **kwargs): pass
    def on_save(self, args, state, control, **kwargs): pass
    def on_log(self, args, state, control, logs=None, **kwargs): pass
    def on_prediction_step(self, args, state, control, **kwargs): pass
    def on_push_begin(self, args, state, control, **kwargs): pass


class ExportableState:
    """A callback whose internal state goes into ``trainer_state.json`` (for exact resume)."""

    def state(self) -> dict:
        raise NotImplementedError

    def restore(self, attributes: dict) -> None:
        """Set the attributes :meth:`state` exports; any other name in a checkpoint is ignored, loudly
        (``trainer_state.json`` must not be able to replace a method or an arbitrary attribute)."""
        exported = set(self.state().get("attributes", {}))
        for k, v in attributes.items():
            if k not in exported:
                logger.warning("%s: ignoring %r from the checkpoint's trainer_state.json; the callback exports only "
                               "%s", type(self).__name__, k, sorted(exported))
                continue
            setattr(self, k, v)


class CallbackHandler(TrainerCallback):
    """Calls each callback's event in order, passing the shared kwargs."""

    def __init__(self, callbacks, model=None, processing_class=None):
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.train_state = None
        self.train_dataloader = None
        self.eval_dataloader = None

    def add_callback(self, callback):
        cb = callback() if isinstance(callback, type) else callback
        cb_class = callback if isinstance(callback, type) else callback.__class__
        if any(c.__class__ is cb_class for c in self.callbacks):
            logger.warning("adding a second %s to the callbacks (the list now has it twice)", cb_class.__name__)
        self.callbacks.append(cb)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if (isinstance(callback, type) and cb.__class__ is callback) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback):
        self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(cb.__class__.__name__ for cb in self.callbacks)

    # Events that reset flags first, as in transformers.
    def on_train_begin(self, args, state, control):
        control._new_training()
        return self.call_event("on_train_begin", args, state, control)

    def on_epoch_begin(self, args, state, control):
        control._new_epoch()
        return self.call_event("on_epoch_begin", args, state, control)

    def on_step_begin(self, args, state, control):
        control._new_step()
        return self.call_event("on_step_begin", args, state, control)

    def on_log(self, args, state, control, logs):
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs)

    def on_evaluate(self, args, state, control, metrics):
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics)

    def on_save(self, args, state, control):
        control.should_save = False
        return self.call_event("on_save", args, state, control)

    def on_predict(self, args, state, control, metrics):
        return self.call_event("on_predict", args, state, control, metrics=metrics)

    def call_event(self, event, args, state, control, **kwargs):
        for cb in self.callbacks:
            result = getattr(cb, event)(
                args, state, control,
                model=self.model, train_state=self.train_state, processing_class=self.processing_class,
                train_dataloader=self.train_dataloader, eval_dataloader=self.eval_dataloader, **kwargs,
            )
            if result is not None:
                control = result
        return control


# The other events just forward to every callback (on_init_end, on_step_end, on_epoch_end, ...).
for _name in [n for n in vars(TrainerCallback) if n.startswith("on_")]:
    if _name not in vars(CallbackHandler):
        setattr(CallbackHandler, _name, (lambda ev: lambda self, args, state, control, **kw:
                                         self.call_event(ev, args, state, control, **kw))(_name))


class DefaultFlowCallback(TrainerCallback):
    """Turns the logging/eval/save cadences of the arguments into control flags."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and state.global_step % state.logging_steps == 0:
            control.should_log = True
        if (args.eval_strategy == "steps" and state.global_step % state.eval_steps == 0
                and args.eval_delay <= state.global_step):
            control.should_evaluate = True
        if args.save_strategy == "steps" and state.save_steps > 0 and state.global_step % state.save_steps == 0:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            # As transformers 5: a step-based run also evaluates and saves at its last step (an
            # epoch-based one does both at the epoch's end, so not here: no second save).
            if (args.eval_strategy == "steps" and state.global_step % state.eval_steps != 0
                    and args.eval_delay <= state.global_step):
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control


class ProgressCallback(TrainerCallback):
    """A tqdm bar for training and evaluation; the postfix is refreshed on logging steps only."""

    def __init__(self, max_str_len: int = 100):
        self.training_bar = None
        self.prediction_bar = None
        self.max_str_len = max_str_len

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        from tqdm.auto import tqdm

        if self.prediction_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
            self.prediction_bar = tqdm(total=total, leave=self.training_bar is None, dynamic_ncols=True)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self):
        if self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        shown = {}
        for k in ("loss", "learning_rate", "grad_norm", "samples_per_second", "tokens_per_second"):
            if k in logs:
                shown[k.replace("_per_second", "/s")] = _short(logs[k])
        if shown:
            self.training_bar.set_postfix(shown, refresh=False)
        if any(k.startswith("eval_") for k in logs) or "train_runtime" in logs:
            self.training_bar.write(str({k: _short(v) for k, v in logs.items()})[: 10 * self.max_str_len])

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
        self.training_bar = None


def _short(v):
    return float(f"{v:.4g}") if isinstance(v, float) else v


class PrinterCallback(TrainerCallback):
    """Prints the logs (used instead of the progress bar when ``disable_tqdm=True``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print({k: _short(v) for k, v in logs.items()})


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop when ``metric_for_best_model`` has not improved for ``early_stopping_patience`` evaluations.

    An evaluation counts as an improvement when it beats the best so far by more than
    ``early_stopping_threshold`` (in the direction given by ``greater_is_better``).
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0):
        if early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {early_stopping_patience}")
        if early_stopping_threshold < 0:
            raise ValueError(f"early_stopping_threshold must be >= 0, got {early_stopping_threshold}")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.early_stopping_patience_counter = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback needs TrainingArguments.metric_for_best_model "
                             "(or load_best_model_at_end=True, which defaults it to 'loss')")
        if args.eval_strategy == "no":
            raise ValueError("EarlyStoppingCallback needs evaluations: set eval_strategy to 'steps' or 'epoch'")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = args.metric_for_best_model
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            logger.warning("early stopping: metric %r not in the evaluation metrics %s; not checking",
                           key, sorted(metrics or {}))
            return
        best = state.best_metric
        improved = best is None or (
            (value > best if args.greater_is_better else value < best)
            and abs(value - best) > self.early_stopping_threshold
        )
        self.early_stopping_patience_counter = 0 if improved else self.early_stopping_patience_counter + 1
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {"early_stopping_patience": self.early_stopping_patience,
                     "early_stopping_threshold": self.early_stopping_threshold},
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
