import pytest

from functrain.trainer.callbacks import (
    CallbackHandler, DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, TrainerCallback,
    TrainerControl, TrainerState,
)
from functrain.trainer.args import TrainingArguments


def _flow(args, max_steps):
    """The flags DefaultFlowCallback raises at each step end, as (step, log, eval, save, stop)."""
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    state.compute_steps(args, max_steps)
    handler = CallbackHandler([DefaultFlowCallback()])
    out = []
    for step in range(1, max_steps + 1):
        handler.on_step_begin(args, state, control)
        state.global_step = step
        control = handler.on_step_end(args, state, control)
        out.append((step, control.should_log, control.should_evaluate, control.should_save,
                    control.should_training_stop))
    return out


def test_step_cadences(tmp_path):
    args = TrainingArguments(str(tmp_path), logging_steps=2, logging_first_step=True, eval_strategy="steps",
                             eval_steps=3, eval_delay=4, save_steps=5)
    flags = _flow(args, 7)
    assert [s for s, log, *_ in flags if log] == [1, 2, 4, 6]
    # step 3 is before eval_delay=4; the last step evaluates too (transformers 5's DefaultFlowCallback)
    assert [s for s, _, ev, *_ in flags if ev] == [6, 7]
    assert [s for s, _, _, sv, _ in flags if sv] == [5, 7]  # the last step saves too
    assert flags[-1][-1] is True and not any(f[-1] for f in flags[:-1])


def test_ratio_steps(tmp_path):
    args = TrainingArguments(str(tmp_path), logging_steps=0.25, save_strategy="no")
    flags = _flow(args, 8)
    assert [s for s, log, *_ in flags if log] == [2, 4, 6, 8]
    assert not any(f[3] for f in flags)


def test_epoch_cadence(tmp_path):
    args = TrainingArguments(str(tmp_path), logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch")
    state, control = TrainerState(max_steps=10, epoch=1.0), TrainerControl()
    control = CallbackHandler([DefaultFlowCallback()]).on_epoch_end(args, state, control)
    assert control.should_log and control.should_evaluate and control.should_save


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step_end", state.global_step, kw["train_state"]))

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", logs))
        control.should_training_stop = True
        return control


def test_handler_order_and_kwargs(tmp_path, capsys):
    args = TrainingArguments(str(tmp_path))
    rec = Recorder()
    handler = CallbackHandler([rec, PrinterCallback])
    handler.train_state = "the-state"
    state, control = TrainerState(global_step=3), TrainerControl(should_log=True)
    control = handler.on_step_end(args, state, control)
    control = handler.on_log(args, state, control, logs={"loss": 0.5})
    assert rec.events == [("step_end", 3, "the-state"), ("log", {"loss": 0.5})]
    assert control.should_training_stop and not control.should_log  # on_log resets should_log
    assert "{'loss': 0.5}" in capsys.readouterr().out
    assert isinstance(handler.pop_callback(PrinterCallback), PrinterCallback)
    assert handler.callback_list == "Recorder"
    handler.remove_callback(rec)
    assert handler.callbacks == []


@pytest.mark.parametrize("greater, values, threshold, patience, stop_at", [
    (False, [1.0, 0.9, 0.95, 0.91, 0.92], 0.0, 2, 4),     # no improvement at evals 3 and 4
    (False, [1.0, 0.9, 0.89, 0.88, 0.87], 0.05, 2, 4),    # gains below the threshold at evals 3, 4
    (True, [0.1, 0.2, 0.3, 0.4], 0.0, 1, None),           # always improving
    (True, [0.5, 0.4, 0.6, 0.5, 0.5, 0.5], 0.0, 3, 6),
])
def test_early_stopping(tmp_path, greater, values, threshold, patience, stop_at):
    args = TrainingArguments(str(tmp_path), eval_strategy="steps", eval_steps=1,
                             metric_for_best_model="eval_metric", greater_is_better=greater)
    cb = EarlyStoppingCallback(patience, threshold)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    stopped = None
    for i, v in enumerate(values, start=1):
        cb.on_evaluate(args, state, control, metrics={"eval_metric": v})
        # the Trainer updates best_metric after the on_evaluate callbacks, as in transformers
        if state.best_metric is None or (v > state.best_metric if greater else v < state.best_metric):
            state.best_metric = v
        if control.should_training_stop:
            stopped = i
            break
    assert stopped == stop_at
    assert cb.state()["attributes"]["early_stopping_patience_counter"] == cb.early_stopping_patience_counter


def test_early_stopping_needs_metric(tmp_path):
    with pytest.raises(ValueError, match="metric_for_best_model"):
        EarlyStoppingCallback(1).on_train_begin(TrainingArguments(str(tmp_path), eval_strategy="epoch"),
                                                TrainerState(), TrainerControl())
    with pytest.raises(ValueError, match=">= 1"):
        EarlyStoppingCallback(0)


def test_trainer_state_json(tmp_path):
    s = TrainerState(global_step=7, epoch=1.5, log_history=[{"loss": 1.0, "step": 5}], best_metric=0.3,
                     data_position={"epoch": 1, "batch_index": 4, "seed": 42}, loss_scale=1024.0)
    s.save_to_json(str(tmp_path / "s.json"))
    assert TrainerState.load_from_json(str(tmp_path / "s.json")) == s
