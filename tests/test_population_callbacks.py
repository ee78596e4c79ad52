"""PopulationTrainer's HF callbacks: the Trainer's events in the Trainer's order, per-member metrics
equal to N separate Trainer runs' metrics, control flags, EarlyStoppingCallback per member, resume."""

import dataclasses
import os
import shutil

import pytest
import torch

from functrain import Trainer, TrainingArguments, tree
from functrain.trainer.callbacks import EarlyStoppingCallback, ExportableState, TrainerCallback
from functrain.trainer.population import PopulationTrainer
from tests._trainer_fixtures import TinyClassifier, make_dataset

MEMBERS = [{"learning_rate": 2e-2, "seed": 1}, {"learning_rate": 8e-2, "seed": 2, "weight_decay": 0.0}]
COMPARED = ("loss", "learning_rate", "eval_loss", "train_loss")


class Recorder(TrainerCallback):
    """Records (event, global_step) and the logs / metrics each event got."""

    def __init__(self):
        self.events, self.logs, self.evaluations = [], [], []


for _event in [n for n in vars(TrainerCallback) if n.startswith("on_")]:
    def _record(self, args, state, control, _event=_event, **kwargs):
        self.events.append((_event, state.global_step))
        if _event == "on_log":
            self.logs.append((state.global_step, dict(kwargs["logs"])))
        if _event == "on_evaluate":
            self.evaluations.append((state.global_step, dict(kwargs["metrics"])))
    setattr(Recorder, _event, _record)


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7, learning_rate=1e-3,
                weight_decay=0.01, warmup_steps=1, logging_steps=2, eval_strategy="steps", eval_steps=3,
                save_strategy="steps", save_steps=4, report_to="none", disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path), **base)


def _trainer(args, callbacks=None):
    return Trainer(args=args, model_init=lambda: TinyClassifier(p=0.0), train_dataset=make_dataset(40),
                   eval_dataset=make_dataset(12, seed=4), callbacks=callbacks)


def test_events_and_per_member_metrics_equal_separate_trainer_runs(tmp_path):
    args = _args(tmp_path / "pop")
    seen = Recorder()
    pop = PopulationTrainer(_trainer(args), MEMBERS, callbacks=[seen])
    pop.train()
    assert seen.events[0] == ("on_init_end", 0) and seen.events[-1] == ("on_train_end", 7)
    for i, member in enumerate(MEMBERS):
        ref = Recorder()
        trainer = _trainer(dataclasses.replace(args, output_dir=str(tmp_path / f"ref{i}"), **member), [ref])
        trainer.train()
        # The same events at the same steps as a Trainer, with the same metrics per member.
        assert seen.events == ref.events, i
        assert [s for s, _ in seen.logs] == [s for s, _ in ref.logs]
        for (_, logs), (_, want) in zip(seen.logs, ref.logs):
            for key in COMPARED:
                if key in want:
                    assert logs[f"member_{i}/{key}"] == pytest.approx(want[key], rel=1e-5), (i, key)
        assert [s for s, _ in seen.evaluations] == [s for s, _ in ref.evaluations] == [3, 6, 7]
        for (_, got), (_, want) in zip(seen.evaluations, ref.evaluations):
            assert got[f"member_{i}/eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    # HF's names hold the population mean; the members really differ.
    for _, logs in seen.logs:
        for key in COMPARED:
            if key in logs:
                assert logs[key] == pytest.approx(sum(logs[f"member_{i}/{key}"] for i in range(2)) / 2)
    assert seen.logs[0][1]["member_0/loss"] != seen.logs[0][1]["member_1/loss"]
    assert pop.trainer_state.log_history[-1]["step"] == 7 and "member_1/train_loss" in pop.trainer_state.log_history[-1]


def test_epoch_strategies_follow_the_trainer(tmp_path):
    args = _args(tmp_path / "pop", max_steps=10, logging_strategy="epoch", eval_strategy="epoch",
                 save_strategy="epoch")
    seen, ref = Recorder(), Recorder()
    pop = PopulationTrainer(_trainer(args), MEMBERS, callbacks=[seen])
    pop.train()
    trainer = _trainer(dataclasses.replace(args, output_dir=str(tmp_path / "ref"), **MEMBERS[1]), [ref])
    trainer.train()
    assert seen.events == ref.events
    assert [s for s, _ in seen.evaluations] == [5, 10]
    for (_, got), (_, want) in zip(seen.evaluations, ref.evaluations):
        assert got["member_1/eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert sorted(d for d in os.listdir(tmp_path / "pop") if d.startswith("checkpoint")) == ["checkpoint-10",
                                                                                               "checkpoint-5"]
    with pytest.raises(TypeError, match=r"callbacks\[0\] is a object, not a TrainerCallback"):
        PopulationTrainer(_trainer(args), MEMBERS, callbacks=[object()])


class Steer(TrainerCallback):
    """Asks for a log at step 1, an evaluation at 2, a save at 3, the end of the epoch at 4 and
    the end of training at 7 (the arguments ask for none of these)."""

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        control.should_log = step == 1
        control.should_evaluate = step == 2
        control.should_save = step == 3
        control.should_epoch_stop = step == 4
        control.should_training_stop = step == 7
        return control


def test_control_flags_steer_the_population_as_they_steer_a_trainer(tmp_path):
    args = _args(tmp_path / "pop", max_steps=20, gradient_accumulation_steps=1, logging_steps=100,
                 eval_strategy="no", save_strategy="no")
    seen = Recorder()
    pop = PopulationTrainer(_trainer(args), MEMBERS, callbacks=[Steer(), seen])
    out = pop.train()
    assert out["global_step"] == 7 and pop.state.step.tolist() == [7, 7]
    assert [s for s, logs in seen.logs if "loss" in logs] == [1]
    assert [s for s, _ in seen.evaluations] == [2]
    assert os.listdir(tmp_path / "pop") and [d for d in os.listdir(tmp_path / "pop") if d.startswith("checkpoint")] \
        == ["checkpoint-3"]
    assert [e for e in seen.events if e[0] == "on_epoch_end"] == [("on_epoch_end", 4), ("on_epoch_end", 7)]
    # should_epoch_stop skipped the rest of epoch 0 (10 batches): each member equals a Trainer run
    # steered by the same callback.
    members = pop.member_states()
    for i, member in enumerate(MEMBERS):
        trainer = _trainer(dataclasses.replace(args, output_dir=str(tmp_path / f"ref{i}"), **member), [Steer()])
        trainer.train()
        assert trainer.state.global_step == 7
        diff = tree.relative_difference(members[i].params, trainer.train_state.params)
        assert diff < 1e-6, (i, diff)


def test_early_stopping_callback_applies_per_member(tmp_path):
    args = _args(tmp_path, max_steps=10, gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                 eval_strategy="steps", eval_steps=2, logging_steps=2, save_strategy="no",
                 metric_for_best_model="eval_loss")
    members = [{"learning_rate": 1e-4, "seed": 1}, {"learning_rate": 1e-1, "seed": 2}]
    pop = PopulationTrainer(_trainer(args), members, callbacks=[EarlyStoppingCallback(2, 0.02)])
    pop.train()
    assert pop.state.step.tolist() == [6, 10]  # member 0 plateaus; member 1 trains on
    with pytest.raises(ValueError, match="disagree"):
        PopulationTrainer(_trainer(args), members, early_stopping_patience=3, callbacks=[EarlyStoppingCallback(2)])


class Counter(TrainerCallback, ExportableState):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def state(self):
        return {"args": {}, "attributes": {"steps": self.steps}}


def test_resume_restores_trainer_state_and_stateful_callbacks(tmp_path):
    args = _args(tmp_path / "whole", max_steps=6, save_steps=3, gradient_accumulation_steps=1)
    whole_counter = Counter()
    whole = PopulationTrainer(_trainer(args), MEMBERS, callbacks=[whole_counter])
    whole.train()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    counter = Counter()
    resumed = PopulationTrainer(_trainer(dataclasses.replace(args, output_dir=str(tmp_path / "resumed"))), MEMBERS,
                                callbacks=[counter])
    resumed.train(resume_from_checkpoint=True)
    for a, b in zip(tree.leaves(whole.state), tree.leaves(resumed.state)):
        assert torch.equal(a, b)
    assert counter.steps == whole_counter.steps == 6
    runtime = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    drop = [{k: v for k, v in e.items() if k not in runtime} for e in whole.trainer_state.log_history]
    assert [{k: v for k, v in e.items() if k not in runtime} for e in resumed.trainer_state.log_history] == drop


class SigtermAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # the runner finishes the step, saves, and stops


def test_sigterm_saves_the_population_and_the_resume_is_bitwise(tmp_path):
    args = _args(tmp_path / "whole", max_steps=6, save_strategy="no", gradient_accumulation_steps=1)
    whole = PopulationTrainer(_trainer(args), MEMBERS)
    whole.train()
    stopped_args = dataclasses.replace(args, output_dir=str(tmp_path / "stopped"))
    stopped = PopulationTrainer(_trainer(stopped_args), MEMBERS, callbacks=[SigtermAt(4)])
    assert stopped.train()["global_step"] == 4
    assert sorted(d for d in os.listdir(tmp_path / "stopped") if d.startswith("checkpoint")) == ["checkpoint-4"]
    resumed = PopulationTrainer(_trainer(stopped_args), MEMBERS)
    assert resumed.train(resume_from_checkpoint=True)["global_step"] == 6
    for a, b in zip(tree.leaves(whole.state), tree.leaves(resumed.state)):
        assert torch.equal(a, b)
