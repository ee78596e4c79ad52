"""Trainer.hyperparameter_search with optuna: HF semantics, pruning, a better lr, reproducible best run."""

import sys

import pytest

from functrain import Trainer, TrainingArguments
from functrain.trainer import hp_search
from functrain.step.population import PopulationError
from tests._trainer_fixtures import make_dataset, make_model

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trainer(tmp_path, **kw):
    args = dict(per_device_train_batch_size=8, max_steps=6, learning_rate=1e-5, eval_strategy="steps", eval_steps=3,
                logging_steps=3, save_strategy="no", report_to="none", disable_tqdm=True, seed=3)
    args.update(kw)
    rows = make_dataset(72)  # train and eval labelled by the same function (make_dataset's w depends on n)
    return Trainer(args=TrainingArguments(str(tmp_path), **args), model_init=lambda: make_model(p=0.0),
                   train_dataset=rows[:48], eval_dataset=rows[48:])


def _lr_space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-1, log=True)}


def test_search_finds_a_better_learning_rate_and_best_run_is_reproducible(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    bad = trainer.evaluate()["eval_loss"]  # the starting point: lr 1e-5 barely moves

    best = trainer.hyperparameter_search(hp_space=_lr_space, n_trials=6, direction="minimize",
                                         sampler=optuna.samplers.TPESampler(seed=0))
    assert isinstance(best, hp_search.BestRun)
    assert best.objective < bad - 0.05, (best, bad)
    assert best.hyperparameters["learning_rate"] > 1e-4
    assert (tmp_path / f"run-{best.run_id}").is_dir()
    assert trainer.args.learning_rate == 1e-5  # the trainer's own arguments are restored

    again, pruned = hp_search.run_trial(trainer, best.hyperparameters, None, hp_search.default_compute_objective,
                                        str(tmp_path / "rerun"))
    assert not pruned
    assert again == pytest.approx(best.objective, rel=1e-6)


def test_pruning_stops_a_trial_at_an_intermediate_evaluation(tmp_path):
    trainer = _trainer(tmp_path, max_steps=9)
    steps_trained = []
    trainer.add_callback(type("Steps", (hp_search.TrainerCallback,), {
        "on_train_end": lambda self, args, state, control, **kw: steps_trained.append(state.global_step)}))

    class PruneAfterFirstTrial(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number > 0 and bool(trial.intermediate_values)

    trainer.hyperparameter_search(hp_space=_lr_space, n_trials=2, pruner=PruneAfterFirstTrial(),
                                  sampler=optuna.samplers.RandomSampler(seed=0))
    assert steps_trained == [9, 3]  # trial 1 stopped at its first evaluation (step 3)


def test_default_objective_and_space_match_transformers():
    from transformers.trainer_utils import default_compute_objective as hf_objective

    for metrics in ({"eval_loss": 0.7, "epoch": 1.0, "eval_runtime": 2.0},
                    {"eval_loss": 0.7, "eval_accuracy": 0.5, "eval_f1": 0.25, "eval_samples_per_second": 9.0}):
        assert hp_search.default_compute_objective(metrics) == hf_objective(metrics)
    trial = optuna.trial.FixedTrial({"learning_rate": 3e-5, "num_train_epochs": 2, "seed": 5,
                                     "per_device_train_batch_size": 16})
    assert hp_search.default_hp_space_optuna(trial) == {"learning_rate": 3e-5, "num_train_epochs": 2, "seed": 5,
                                                        "per_device_train_batch_size": 16}


def test_errors(tmp_path, monkeypatch):
    trainer = Trainer(model=make_model(), args=TrainingArguments(str(tmp_path), report_to="none"),
                      train_dataset=make_dataset(8))
    with pytest.raises(RuntimeError, match="model_init"):
        trainer.hyperparameter_search(n_trials=1)
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        trainer.hyperparameter_search(backend="ray")
    with pytest.raises(ValueError, match=r"\['width'\] are not TrainingArguments fields"):
        hp_search.trial_arguments(trainer.args, {"width": 3}, None)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match="pip install 'functrain\\[optuna\\]'"):
        trainer.hyperparameter_search(n_trials=1)


def test_population_search_trains_all_trials_at_once_and_matches_a_sequential_rerun(tmp_path):
    trainer = _trainer(tmp_path, data_seed=0)
    best = trainer.hyperparameter_search(hp_space=_lr_space, n_trials=6, population=True,
                                         sampler=optuna.samplers.TPESampler(seed=0))
    assert best.hyperparameters["learning_rate"] > 1e-4
    again, _ = hp_search.run_trial(trainer, best.hyperparameters, None, hp_search.default_compute_objective,
                                   str(tmp_path / "rerun"))
    assert again == pytest.approx(best.objective, rel=1e-5)  # the member equals an ordinary Trainer run
    with pytest.raises(PopulationError, match="cannot vary inside one vmapped graph"):
        trainer.hyperparameter_search(n_trials=2, population=True)  # the default space varies the batch size


def test_population_search_with_pbt_prunes_by_replacement(tmp_path):
    trainer = _trainer(tmp_path, data_seed=0, max_steps=12)
    best = trainer.hyperparameter_search(hp_space=_lr_space, n_trials=4, population=True, pbt_interval=3,
                                         pbt_perturb=(0.5, 2.0), sampler=optuna.samplers.RandomSampler(seed=0))
    schedule = best.run_summary["pbt_schedule"]
    assert [e["step"] for e in schedule] == [3, 6, 9]
    replaced = sorted({int(d) for e in schedule for d in e["copies"]})
    assert best.run_summary["pruned_trials"] == replaced  # trial numbers are the member indices here
    # The best run's hyperparameters are those its member ends with (after PBT's perturbations).
    assert set(best.hyperparameters) >= {"learning_rate", "weight_decay"}
    final_lrs = schedule[-1]["hyperparameters"]["learning_rate"]
    assert best.hyperparameters["learning_rate"] == pytest.approx(final_lrs[int(best.run_id)])
    again = trainer.hyperparameter_search(hp_space=_lr_space, n_trials=4, population=True, pbt_interval=3,
                                          pbt_perturb=(0.5, 2.0), sampler=optuna.samplers.RandomSampler(seed=0))
    assert again.run_summary["pbt_schedule"] == schedule and again.objective == best.objective
    with pytest.raises(ValueError, match="needs population=True"):
        trainer.hyperparameter_search(hp_space=_lr_space, n_trials=1, pbt_interval=3)
