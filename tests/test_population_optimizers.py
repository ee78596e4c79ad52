"""Schedule-free and GaLore populations: N members in one vmapped step equal N Trainer runs.

Schedule-free keeps y, z (and the averaged x it is evaluated at) per member; GaLore refreshes its
projections with an SVD inside ``torch.cond`` every ``update_proj_gap`` steps, under vmap too."""

import dataclasses

import pytest

from functrain import Trainer, TrainingArguments, tree
from functrain.step.population import PopulationError
from functrain.trainer.population import PopulationTrainer
from tests._trainer_fixtures import TinyClassifier, make_dataset

MEMBERS = [{"learning_rate": 5e-2, "seed": 1, "adam_beta1": 0.8},
           {"learning_rate": 1e-2, "seed": 2, "weight_decay": 0.0, "adam_beta2": 0.99}]


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=5, learning_rate=1e-3,
                weight_decay=0.01, warmup_steps=2, max_grad_norm=1.0, save_strategy="no", report_to="none",
                disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path), **base)


def _trainer(args):
    return Trainer(args=args, model_init=lambda: TinyClassifier(p=0.0), train_dataset=make_dataset(40),
                   eval_dataset=make_dataset(12, seed=4))


@pytest.mark.parametrize("optim,settings", [
    ("schedule_free_adamw", {}), ("schedule_free_sgd", {"gradient_accumulation_steps": 1}),
    ("galore_adamw", {"optim_target_modules": ["net.0"], "optim_args": "rank=2,update_proj_gap=2"})])
def test_population_equals_separate_trainer_runs(tmp_path, optim, settings):
    args = _args(tmp_path, optim=optim, **settings)
    pop = PopulationTrainer(_trainer(args), MEMBERS)
    pop.train()
    evals = pop.evaluate()
    members = pop.member_states()
    for i, member in enumerate(MEMBERS):
        trainer = _trainer(dataclasses.replace(args, **member))
        trainer.train()
        diff = tree.relative_difference(members[i].params, trainer.train_state.params)
        print(f"{optim} member {i}: params relative difference {diff:.2e}")
        assert diff < 1e-6, (i, diff)
        # Evaluated as the Trainer evaluates (schedule-free: at the averaged x, not at y).
        assert evals[i]["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    assert tree.relative_difference(members[0].params, members[1].params) > 1e-3


def test_schedule_free_warmup_cannot_vary_per_member(tmp_path):
    args = _args(tmp_path, optim="schedule_free_adamw", lr_scheduler_type="linear")
    with pytest.raises(PopulationError, match="takes its warmup as a Python int"):
        PopulationTrainer(_trainer(args), [{"warmup_steps": 1}, {"warmup_steps": 3}])
