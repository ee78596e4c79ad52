"""PopulationTrainer: N members of a Trainer's run in one vmapped step equal N Trainer runs."""

import dataclasses

import pytest

from functrain import Trainer, TrainingArguments
from functrain.step.population import PopulationError
from functrain.trainer.population import PopulationTrainer
from tests._trainer_fixtures import make_dataset, make_model

MEMBERS = [{"learning_rate": 5e-2, "seed": 1}, {"learning_rate": 1e-2, "seed": 2, "weight_decay": 0.0},
           {"learning_rate": 1e-1, "warmup_steps": 2, "seed": 3, "adam_beta1": 0.8}]


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=5, learning_rate=1e-3,
                weight_decay=0.01, warmup_steps=1, max_grad_norm=1.0, save_strategy="no", report_to="none",
                disable_tqdm=True, seed=0, data_seed=0)  # one data order for all
    base.update(kw)
    return TrainingArguments(str(tmp_path), **base)


def _trainer(args):
    return Trainer(args=args, model_init=lambda: make_model(p=0.0), train_dataset=make_dataset(40),
                   eval_dataset=make_dataset(12, seed=4))


def test_population_trainer_equals_separate_trainer_runs(tmp_path):
    args = _args(tmp_path)
    pop = PopulationTrainer(_trainer(args), MEMBERS)
    out = pop.train()
    evals = pop.evaluate()
    assert out["global_step"] == 5 and len(evals) == 3
    for i, member in enumerate(MEMBERS):
        changes = {k: v for k, v in member.items()}
        trainer = _trainer(dataclasses.replace(args, **changes))
        trainer.train()
        ref = trainer.evaluate()["eval_loss"]
        assert evals[i]["eval_loss"] == pytest.approx(ref, rel=1e-5), i
        train_loss = next(h["train_loss"] for h in trainer.state.log_history if "train_loss" in h)
        assert out["train_loss"][i] == pytest.approx(train_loss, rel=1e-5)
    assert len({round(e["eval_loss"], 6) for e in evals}) == 3


def test_population_trainer_rejects_what_cannot_vary(tmp_path):
    with pytest.raises(PopulationError, match=r"\['per_device_train_batch_size'\] cannot vary"):
        PopulationTrainer(_trainer(_args(tmp_path)), [{"per_device_train_batch_size": 8}])
    with pytest.raises(PopulationError, match="varies per member needs lr_scheduler_type='linear'"):
        PopulationTrainer(_trainer(_args(tmp_path, lr_scheduler_type="cosine")), [{"warmup_steps": 2}, {}])


# -- v2: registry optimizers and schedules, logging, PBT, checkpoints, save_model ------------------

import json
import os

import torch

from functrain import tree
from functrain.trainer import registry

FOUR = [{"learning_rate": 5e-2, "seed": 1}, {"learning_rate": 1e-2, "seed": 2, "weight_decay": 0.0},
        {"learning_rate": 2e-2, "seed": 3, "adam_beta1": 0.8, "adam_beta2": 0.99},
        {"learning_rate": 3e-2, "seed": 4, "weight_decay": 0.1, "adam_epsilon": 1e-6}]


@pytest.mark.parametrize("optim,accumulation,schedule", [
    ("adamw_torch", 2, "linear"), ("adamw_torch", 1, "cosine"), ("lion", 2, "constant_with_warmup"),
    ("sgd", 1, "polynomial"), ("adafactor", 2, "inverse_sqrt")])
def test_population_of_4_equals_4_trainer_runs(tmp_path, optim, accumulation, schedule):
    args = _args(tmp_path, optim=optim, gradient_accumulation_steps=accumulation, lr_scheduler_type=schedule,
                 warmup_steps=2, max_steps=4)
    pop = PopulationTrainer(_trainer(args), FOUR)
    pop.train()
    members = pop.member_states()
    for i, member in enumerate(FOUR):
        trainer = _trainer(dataclasses.replace(args, **member))
        trainer.train()
        diff = tree.relative_difference(members[i].params, trainer.train_state.params)
        print(f"{optim} accumulation={accumulation} {schedule} member {i}: relative difference {diff:.2e}")
        assert diff < 1e-6, (i, diff)
    # The members really differ.
    assert tree.relative_difference(members[0].params, members[1].params) > 1e-3


# schedule-free and GaLore: tests/test_population_optimizers.py (their own settings and evaluation).
@pytest.mark.parametrize("optim", sorted(set(registry.POPULATION_OPTIMIZERS) - {
    "adamw_torch", "lion", "sgd", "adafactor", "schedule_free_adamw", "schedule_free_sgd", "galore_adamw",
    "galore_adafactor"}))
def test_every_other_registry_optimizer_equals_trainer_runs(tmp_path, optim):
    args = _args(tmp_path, optim=optim, max_steps=3, gradient_accumulation_steps=1)
    two = FOUR[:2]
    pop = PopulationTrainer(_trainer(args), two)
    pop.train()
    for i, member in enumerate(two):
        trainer = _trainer(dataclasses.replace(args, **member))
        trainer.train()
        diff = tree.relative_difference(pop.member_states()[i].params, trainer.train_state.params)
        print(f"{optim} member {i}: relative difference {diff:.2e}")
        assert diff < 1e-6, (i, diff)


def _pbt_trainer(tmp_path, **kw):
    kw.setdefault("report_to", "tensorboard")
    args = _args(tmp_path, max_steps=8, gradient_accumulation_steps=1, logging_steps=2, eval_strategy="steps",
                 eval_steps=4, save_strategy="steps", save_steps=3, **kw)
    members = [{"learning_rate": lr, "seed": i} for i, lr in enumerate([1e-3, 3e-2, 1e-1, 3e-1])]
    return PopulationTrainer(_trainer(args), members, pbt_interval=2, pbt_fraction=0.25, pbt_perturb=(0.5, 2.0))


def test_population_logs_one_series_per_member_and_the_pbt_schedule(tmp_path):
    pop = _pbt_trainer(tmp_path)
    pop.train()
    losses = [(e["member"], e["step"]) for e in pop.log_history if "loss" in e]
    assert losses == [(m, s) for s in (2, 4, 6, 8) for m in range(4)]
    evals = [(e["member"], e["step"]) for e in pop.log_history if "eval_loss" in e]
    assert evals == [(m, s) for s in (4, 8) for m in range(4)]
    with open(tmp_path / "population_log.jsonl") as f:
        assert [json.loads(line) for line in f] == pop.log_history
    assert [e["step"] for e in pop.pbt_schedule] == [2, 4, 6]
    assert all(len(e["copies"]) == 1 for e in pop.pbt_schedule)
    with open(tmp_path / "pbt_schedule.jsonl") as f:
        assert [json.loads(line) for line in f] == pop.pbt_schedule
    # The state holds what the schedule says: the last round's hyperparameters.
    lrs = [h["learning_rate"] for h in pop.member_hyperparameters()]
    assert lrs == pytest.approx(pop.pbt_schedule[-1]["hyperparameters"]["learning_rate"])
    # TensorBoard: one run (one series) per member, HF's tag names.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for m in range(4):
        events = EventAccumulator(str(tmp_path / "runs" / f"member-{m}"))
        events.Reload()
        got = [(e.step, e.value) for e in events.Scalars("train/loss")]
        want = [(e["step"], e["loss"]) for e in pop.log_history if e["member"] == m and "loss" in e]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
        assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]
    # Same seed, same copy schedule.
    again = _pbt_trainer(tmp_path / "again")
    again.train()
    assert [e["copies"] for e in again.pbt_schedule] == [e["copies"] for e in pop.pbt_schedule]


def test_resumed_population_is_bitwise_equal_to_uninterrupted(tmp_path):
    whole = _pbt_trainer(tmp_path / "whole")
    out = whole.train()
    assert os.path.isdir(tmp_path / "whole" / "checkpoint-3")
    resumed = _pbt_trainer(tmp_path / "resumed")
    os.makedirs(tmp_path / "resumed", exist_ok=True)
    import shutil
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    out_resumed = resumed.train(resume_from_checkpoint=True)
    for a, b in zip(tree.leaves(whole.state), tree.leaves(resumed.state)):
        assert torch.equal(a, b)
    assert out_resumed == out
    assert resumed.pbt_schedule == whole.pbt_schedule and resumed.log_history == whole.log_history
    # The resumed run really starts from the checkpoint: a changed saved state changes the result.
    from safetensors.torch import load_file, save_file
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "tampered" / "checkpoint-3")
    saved = tmp_path / "tampered" / "checkpoint-3" / "population_state.safetensors"
    tensors = load_file(saved)
    tensors = {k: v * 1.5 if k.startswith("state.params.") else v for k, v in tensors.items()}
    save_file(tensors, saved)
    tampered = _pbt_trainer(tmp_path / "tampered")
    tampered.train(resume_from_checkpoint=str(tmp_path / "tampered" / "checkpoint-3"))
    assert tree.relative_difference(tampered.state.params, whole.state.params) > 1e-3


def test_save_model_writes_an_hf_loadable_member(tmp_path):
    from transformers import BertForSequenceClassification

    from tests.step_models import VOCAB, bert_classifier

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, VOCAB, (8,), generator=g), "labels": int(i % 3)} for i in range(16)]
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=1)
    trainer = Trainer(args=args, model_init=bert_classifier, train_dataset=data)
    pop = PopulationTrainer(trainer, [{"learning_rate": 1e-2, "seed": 0}, {"learning_rate": 1e-1, "seed": 1}])
    pop.train()
    folder = pop.save_model(1)
    loaded = BertForSequenceClassification.from_pretrained(folder)
    member = pop.member_states()[1]
    for name, p in loaded.named_parameters():
        assert torch.equal(p, member.params[name]), name
    assert not torch.equal(pop.member_states()[0].params["classifier.weight"], member.params["classifier.weight"])
    with pytest.raises(IndexError, match=r"member must be an int in \[0, 2\)"):
        pop.save_model(2)


def test_population_refuses_what_it_cannot_build(tmp_path):
    from functrain.core import optim as foptim

    trainer = Trainer(args=_args(tmp_path), model=make_model(p=0.0), train_dataset=make_dataset(40),
                      optimizers=(foptim.sgd(1e-2), None))
    with pytest.raises(PopulationError, match="optimizers=... or optimizer_cls_and_kwargs=... cannot be a population"):
        PopulationTrainer(trainer, 2)
    with_class = Trainer(args=_args(tmp_path), model=make_model(p=0.0), train_dataset=make_dataset(40),
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-2}))
    with pytest.raises(PopulationError, match="optimizer_cls_and_kwargs=... cannot be a population"):
        PopulationTrainer(with_class, 2)
    no_eval = Trainer(args=_args(tmp_path), model_init=lambda: make_model(p=0.0), train_dataset=make_dataset(40))
    with pytest.raises(ValueError, match="pbt_interval needs an eval_dataset"):
        PopulationTrainer(no_eval, 2, pbt_interval=2)
    with pytest.raises(ValueError, match=r"report_to \['wandb'\] is not supported for populations"):
        PopulationTrainer(_trainer(_args(tmp_path, report_to="wandb")), 2)
    with pytest.raises(PopulationError, match="min_lr_rate"):
        PopulationTrainer(_trainer(_args(tmp_path, lr_scheduler_type="cosine_with_min_lr",
                                         lr_scheduler_kwargs={"min_lr": 1e-5})), [{"learning_rate": 1e-2}, {}])


def test_members_stop_early_one_by_one(tmp_path):
    args = _args(tmp_path, max_steps=10, gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                 eval_strategy="steps", eval_steps=2, logging_steps=2)
    members = [{"learning_rate": 1e-4, "seed": 1}, {"learning_rate": 1e-1, "seed": 2}]
    pop = PopulationTrainer(_trainer(args), members, early_stopping_patience=2, early_stopping_threshold=0.02)
    pop.train()
    # Member 0 barely learns: evaluations at 4 and 6 bring no gain > 0.02, so it stops at step 6.
    assert pop.state.step.tolist() == [6, 10]
    slow = _trainer(dataclasses.replace(args, max_steps=6, eval_strategy="no", **members[0]))
    slow.train()
    assert tree.relative_difference(pop.member_states()[0].params, slow.train_state.params) < 1e-6
    fast = _trainer(dataclasses.replace(args, eval_strategy="no", **members[1]))
    fast.train()
    assert tree.relative_difference(pop.member_states()[1].params, fast.train_state.params) < 1e-6
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluations"):
        PopulationTrainer(_trainer(_args(tmp_path)), 2, early_stopping_patience=2)
