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
    with pytest.raises(PopulationError, match="lr_scheduler_type='linear'"):
        PopulationTrainer(_trainer(_args(tmp_path, lr_scheduler_type="cosine")), 2)
