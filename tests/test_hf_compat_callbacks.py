"""transformers' tests/trainer/test_trainer_callback.py event-flow test, ported with
``from functrain import ...``: the exact sequence of callback events over a training run, including
``on_pre_optimizer_step`` / ``on_optimizer_step`` / ``on_substep_end``, and the stateful-callback
restore of ``restore_callback_states_from_checkpoint``."""

import os

import pytest

from _hf_compat_fixtures import RegressionDataset, regression_pretrained_model
from functrain import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

EVENTS = ["on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate",
          "on_predict", "on_save", "on_log", "on_prediction_step"]


class EventRecorderCallback(TrainerCallback):
    def __init__(self):
        self.events = []


for _event in EVENTS:  # one recording method per event, as HF's EventRecorderCallback
    setattr(EventRecorderCallback, _event,
            (lambda name: lambda self, args, state, control, **kw: self.events.append(name))(_event))


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("disable_tqdm", True)
    args = TrainingArguments(str(tmp_path), report_to="none", **kwargs)
    return Trainer(regression_pretrained_model(), args, train_dataset=RegressionDataset(length=32),
                   eval_dataset=RegressionDataset(length=32), callbacks=[EventRecorderCallback])


def _recorder(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EventRecorderCallback))


def _expected_events(trainer):
    """HF's _get_expected_events, with on_substep_end for each accumulated microbatch but the last."""
    a, state = trainer.args, trainer.state
    expected = ["on_init_end", "on_train_begin"]
    step = 0
    steps_per_epoch = len(trainer.get_train_dataloader())
    evaluation = ["on_prediction_step"] * len(trainer.get_eval_dataloader()) + ["on_log", "on_evaluate"]
    for _ in range(state.num_train_epochs):
        expected.append("on_epoch_begin")
        for _ in range(steps_per_epoch):
            step += 1
            expected += (["on_step_begin"] + ["on_substep_end"] * (a.gradient_accumulation_steps - 1)
                         + ["on_pre_optimizer_step", "on_optimizer_step", "on_step_end"])
            if step % a.logging_steps == 0:
                expected.append("on_log")
            if a.eval_strategy == "steps" and step % a.eval_steps == 0:
                expected += evaluation
            if step == state.max_steps and a.eval_strategy == "steps" and step % a.eval_steps != 0:
                expected += evaluation
            if step % a.save_steps == 0 or step == state.max_steps:
                expected.append("on_save")
        expected.append("on_epoch_end")
        if a.eval_strategy == "epoch":
            expected += evaluation
    return expected + ["on_log", "on_train_end"]


@pytest.mark.parametrize("kwargs", [
    {},
    {"logging_steps": 5},
    {"save_steps": 5},
    {"eval_steps": 5, "eval_strategy": "steps"},
    {"eval_strategy": "epoch"},
    {"logging_steps": 3, "save_steps": 10, "eval_steps": 5, "eval_strategy": "steps"},
    {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 2},
], ids=["default", "log5", "save5", "eval5", "eval_epoch", "mixed", "accumulation"])
def test_event_flow(tmp_path, kwargs):
    trainer = _trainer(tmp_path, save_only_model=True, **kwargs)
    trainer.train()
    assert _recorder(trainer).events == _expected_events(trainer)


def test_predict_fires_prediction_step_and_predict(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.predict(RegressionDataset(length=20))
    assert _recorder(trainer).events == ["on_init_end"] + ["on_prediction_step"] * 3 + ["on_predict"]


class Stateful(EarlyStoppingCallback):
    pass


def _resume_with(tmp_path, restore: bool, patience_now: int):
    args = dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=4, metric_for_best_model="loss",
                report_to="none", disable_tqdm=True, per_device_train_batch_size=8)
    first = Trainer(regression_pretrained_model(), TrainingArguments(str(tmp_path), **args),
                    train_dataset=RegressionDataset(length=32), eval_dataset=RegressionDataset(length=16),
                    callbacks=[Stateful(early_stopping_patience=7)])
    first.train()
    second = Trainer(regression_pretrained_model(), TrainingArguments(
        str(tmp_path), restore_callback_states_from_checkpoint=restore, **{**args, "max_steps": 4}),
        train_dataset=RegressionDataset(length=32), eval_dataset=RegressionDataset(length=16),
        callbacks=[Stateful(early_stopping_patience=patience_now)])
    second.train(resume_from_checkpoint=os.path.join(str(tmp_path), "checkpoint-2"))
    return next(cb for cb in second.callback_handler.callbacks if isinstance(cb, Stateful))


def test_restore_callback_states_from_checkpoint(tmp_path):
    """True: the callback is rebuilt from the checkpoint's constructor args (HF); False: the one
    passed now is kept (its counters are still restored, for an exact resume)."""
    assert _resume_with(tmp_path / "a", restore=True, patience_now=3).early_stopping_patience == 7
    assert _resume_with(tmp_path / "b", restore=False, patience_now=3).early_stopping_patience == 3
