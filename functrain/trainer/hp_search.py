"""``Trainer.hyperparameter_search`` with the Hugging Face semantics (optuna backend).

Each trial: the hyperparameters from ``hp_space(trial)`` replace the matching
``TrainingArguments`` fields (``output_dir`` becomes ``<output_dir>/run-<trial.number>``), the
model is rebuilt by ``model_init`` (given the trial if it takes one argument, as HF does), the
Trainer trains, and the objective is ``compute_objective(eval metrics)``. Pruning: every
evaluation during training reports the objective to optuna (``trial.report``); when
``trial.should_prune()`` says so, training stops at once and the trial is marked pruned.

The driver is a callback plus a loop over trials: nothing in the training loop knows about it.
With ``population=True`` (and a search space of tensor hyperparameters only) all trials train at
once as one vmapped population (:class:`functrain.trainer.population.PopulationTrainer`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from typing import Any, Callable, NamedTuple

from functrain.trainer import registry
from functrain.trainer.callbacks import TrainerCallback


class BestRun(NamedTuple):
    """The best run of a search (same fields as ``transformers.trainer_utils.BestRun``)."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None


def default_compute_objective(metrics: dict[str, float]) -> float:
    """HF's default: ``eval_loss`` if there are no other metrics, else the sum of the other metrics
    (speed metrics ``*_runtime`` / ``*_per_second`` and ``epoch`` left out)."""
    metrics = copy.deepcopy(metrics)
    loss = metrics.pop("eval_loss", None)
    metrics.pop("epoch", None)
    for k in [k for k in metrics if k.endswith("_runtime") or k.endswith("_per_second")]:
        metrics.pop(k)
    return loss if len(metrics) == 0 else sum(metrics.values())


def default_hp_space_optuna(trial) -> dict[str, float]:
    """HF's default optuna search space."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def _import_optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("hyperparameter_search(backend='optuna') needs optuna: pip install 'functrain[optuna]' "
                          "(or pip install optuna)") from e
    return optuna


class _ReportToTrial(TrainerCallback):
    """Reports the objective of every evaluation to the trial; stops training when optuna prunes."""

    def __init__(self, trial, compute_objective):
        self.trial, self.compute_objective = trial, compute_objective
        self.objective = None
        self.pruned = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.objective = self.compute_objective(dict(metrics))
        self.trial.report(self.objective, state.global_step)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True
            control.should_save = False


def trial_arguments(args, hp: dict, run_dir: str | None):
    """``args`` with the trial's hyperparameters (HF casts each value to the field's type)."""
    fields = {f.name: f for f in dataclasses.fields(args) if f.init}
    unknown = sorted(k for k in hp if k not in fields)
    if unknown:
        raise ValueError(f"hyperparameter(s) {unknown} are not TrainingArguments fields; hp_space may only "
                         f"return TrainingArguments names (e.g. learning_rate, num_train_epochs, seed, "
                         "per_device_train_batch_size, weight_decay, warmup_steps)")
    unsupported = sorted(k for k in hp if registry.field_status(k).status != registry.SUPPORTED)
    if unsupported:
        raise ValueError(f"hyperparameter(s) {unsupported} cannot be searched: functrain does not support them "
                         f"({', '.join(registry.field_status(k).status for k in unsupported)}); see "
                         "functrain.trainer.registry.FIELDS")
    changes = {}
    for k, v in hp.items():
        old = getattr(args, k)
        changes[k] = type(old)(v) if old is not None and not isinstance(old, bool) and isinstance(v, (int, float)) \
            else v
    if run_dir is not None:
        changes["output_dir"] = run_dir
        changes["logging_dir"] = os.path.join(run_dir, "runs")
        changes["run_name"] = run_dir
    return dataclasses.replace(args, **changes)


def _model_init_for(model_init: Callable, trial) -> Callable:
    """HF calls ``model_init(trial)`` when it takes one argument, else ``model_init()``."""
    try:
        n = len(inspect.signature(model_init).parameters)
    except (TypeError, ValueError):
        n = 0
    return (lambda: model_init(trial)) if n == 1 else model_init


def run_trial(trainer, hp: dict, trial, compute_objective, run_dir: str | None):
    """Train and evaluate ``trainer`` with ``hp``; return ``(objective, pruned)``. Restores args."""
    saved_args, saved_init = trainer.args, trainer.model_init
    reporter = _ReportToTrial(trial, compute_objective) if trial is not None else None
    trainer.args = trial_arguments(saved_args, hp, run_dir)
    trainer.model_init = _model_init_for(saved_init, trial)
    trainer.train_state = None  # a fresh model from model_init, not the previous trial's state
    trainer._eval_steps = {}  # built for the previous trial's module
    if reporter is not None:
        trainer.add_callback(reporter)
    try:
        trainer.train()
        if reporter is not None and reporter.pruned:
            return reporter.objective, True
        objective = reporter.objective if reporter is not None else None
        if objective is None:
            objective = compute_objective(trainer.evaluate())
        return objective, False
    finally:
        if reporter is not None:
            trainer.remove_callback(reporter)
        trainer.args, trainer.model_init = saved_args, saved_init


def hyperparameter_search(trainer, hp_space=None, compute_objective=None, n_trials: int = 20,
                          direction: str | list[str] = "minimize", backend: str = "optuna", hp_name=None,
                          **kwargs) -> BestRun:
    """See :meth:`functrain.Trainer.hyperparameter_search`."""
    if backend != "optuna":
        raise ValueError(f"backend={backend!r} is not supported; functrain implements backend='optuna'")
    if trainer.model_init is None:
        raise RuntimeError("To use hyperparameter search, you need to pass your model through a model_init function "
                           "(Trainer(model_init=...)): each trial builds a fresh model")
    optuna = _import_optuna()
    hp_space = hp_space or default_hp_space_optuna
    compute_objective = compute_objective or default_compute_objective
    timeout = kwargs.pop("timeout", None)
    n_jobs = kwargs.pop("n_jobs", 1)
    gc_after_trial = kwargs.pop("gc_after_trial", False)
    catch = kwargs.pop("catch", ())
    callbacks = kwargs.pop("callbacks", None)
    population = kwargs.pop("population", False)
    pbt_options = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("pbt_")}
    if pbt_options and not population:
        raise ValueError(f"{sorted(pbt_options)} configure population-based training, which needs population=True")
    if n_jobs != 1:
        raise ValueError("n_jobs must be 1: trials share one Trainer")
    directions = direction if isinstance(direction, list) else None
    study = optuna.create_study(direction=None if directions else direction, directions=directions, **kwargs)
    base_dir = trainer.args.output_dir
    if population:
        if directions:
            raise ValueError("population=True supports a single objective direction")
        return _population_search(trainer, study, hp_space, compute_objective, n_trials, pbt_options)

    def objective(trial):
        hp = hp_space(trial)
        name = hp_name(trial) if hp_name is not None else f"run-{trial.number}"
        value, pruned = run_trial(trainer, hp, trial, compute_objective, os.path.join(base_dir, name))
        if pruned:
            raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks, catch=catch,
                   gc_after_trial=gc_after_trial)
    if directions:
        best = study.best_trials
        return [BestRun(str(t.number), t.values, t.params) for t in best]
    best = study.best_trial
    return BestRun(str(best.number), best.value, best.params)


def _population_search(trainer, study, hp_space, compute_objective, n_trials: int, pbt_options: dict) -> BestRun:
    """All ``n_trials`` trained at once as one vmapped population (see ``PopulationTrainer``).

    The trials are sampled up front (``study.ask``), so the sampler cannot learn from one trial
    before proposing the next (a batch of proposals, like random search). Without ``pbt_interval``
    every member trains to the end. With it (and the other ``pbt_*`` options of
    ``PopulationTrainer``), population-based training prunes by replacement: a trial whose member
    is overwritten by a better one is told to optuna as pruned (its objective at that round is
    reported), and the member's slot trains on with the copied state and perturbed
    hyperparameters. The best run is the best member at the end: its ``hyperparameters`` are the
    ones it ends with, ``run_summary`` holds the copy schedule. ``hp_space`` may only touch
    tensor hyperparameters.
    """
    import optuna

    from functrain.trainer.population import PopulationTrainer

    trials = [study.ask() for _ in range(n_trials)]
    members = [hp_space(t) for t in trials]
    pop = PopulationTrainer(trainer, members, **pbt_options)
    pop.train()
    objectives = [compute_objective(m) for m in pop.evaluate()]
    replaced = _replaced_at(pop.pbt_schedule)
    for i, (trial, value) in enumerate(zip(trials, objectives)):
        if i in replaced:
            step, score = replaced[i]
            trial.report(score, step)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    if not pop.pbt_schedule:
        best = study.best_trial
        return BestRun(str(best.number), best.value, best.params)
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    slot = min(range(n_trials), key=lambda i: sign * objectives[i])
    summary = {"pbt_schedule": pop.pbt_schedule, "pruned_trials": sorted(trials[i].number for i in replaced),
               "initial_hyperparameters": members[slot]}
    return BestRun(str(trials[slot].number), objectives[slot], pop.member_hyperparameters()[slot], summary)


def _replaced_at(schedule: list[dict]) -> dict[int, tuple[int, float]]:
    """``{member: (step, its score)}`` of the first PBT round that overwrote each member."""
    first = {}
    for entry in schedule:
        for dst in entry["copies"]:
            first.setdefault(int(dst), (entry["step"], entry["scores"][int(dst)]))
    return first
