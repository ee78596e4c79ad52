"""PopulationTrainer: a Trainer's whole setup, trained as N members in one vmapped step.

It borrows from a :class:`functrain.Trainer` (composition, no subclassing) what does not change
between members: the datasets and loaders, the collator, the loss, ``compute_metrics`` and the
``TrainingArguments``. Members differ in the hyperparameters the state can hold as tensors:

    ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``,
    ``warmup_steps``, ``seed`` (model init through ``model_init`` and the dropout stream;
    the data order is shared: ``args.data_seed``, else ``args.seed`` of the trainer) and
    ``dropout`` (the ``p`` of the model's :class:`functrain.population.Dropout` modules).

Training runs on :func:`functrain.runner.run` (:mod:`functrain.trainer.population_loop`), with
HF's ``TrainerCallback`` events (``callbacks=``).

Every ``optim`` of :data:`functrain.trainer.registry.OPTIMIZERS` and every ``lr_scheduler_type``
works: the optimizer is the Trainer's own (``registry.build_optimizer``) built by
:func:`functrain.optim.inject_hyperparams`, so each member reads its values from its state. A
``warmup_steps`` that differs between members needs ``lr_scheduler_type="linear"``.

The driver logs one series per member (``log_history`` rows with a ``member`` key, also written to
``output_dir/population_log.jsonl`` and, with ``report_to="tensorboard"``, to
``logging_dir/member-i``), evaluates every ``eval_steps`` (``eval_strategy="steps"``),
saves the whole population every ``save_steps`` (``checkpoint-N/population_state.safetensors``;
``train(resume_from_checkpoint=...)`` continues bitwise), saves any member as an HF-loadable folder
(:meth:`save_model`) and, with ``pbt_interval``, runs population-based training
(:func:`functrain.step.pbt.exploit_and_explore`; the copy schedule is logged in
``pbt_schedule`` and ``output_dir/pbt_schedule.jsonl``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from functrain.adapters.outputs import batch_size_of
from functrain.adapters.peft import is_peft_model
from functrain.core import rng as rnglib
from functrain.core import tree
from functrain.core import foreach
from functrain.core.optim import inject_hyperparams, schedule_free_eval_params
from functrain.core.schedules import get_schedule
from functrain.io import checkpoint as ck
from functrain.step import pbt
from functrain.step import population as P
from functrain.trainer import adapter_population, compat, population_loop, registry
from functrain.trainer.callbacks import TrainerControl, TrainerState
from functrain.trainer.evaluation import EvalPrediction, pad_and_concatenate
from functrain.trainer.integrations import rewrite_logs

TENSOR_HYPERPARAMETERS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                          "warmup_steps", "seed", "dropout")
STATE_FILE = "population_state.safetensors"
META_FILE = "population_trainer.json"
LOG_FILE = "population_log.jsonl"
PBT_FILE = "pbt_schedule.jsonl"
# Schedule settings that are absolute learning rates: a schedule scaled by each member's peak
# would scale them too (HF's relative forms, min_lr_rate, are exact).
_ABSOLUTE_LR_SETTINGS = ("min_lr", "lr_end")


class PopulationTrainer:
    """Train and evaluate N variants of ``trainer``'s run at once.

    Args:
        trainer: a :class:`functrain.Trainer` (its ``model_init`` builds each member when given,
            else every member starts from a copy of ``trainer.model``).
        population: ``N`` (members differ by seed: ``args.seed + i``) or a list of dicts of
            :data:`TENSOR_HYPERPARAMETERS` overriding ``trainer.args`` per member.
        pbt_interval: run population-based training every this many steps (ranking the members
            by ``metric_for_best_model`` of an evaluation, default ``eval_loss``); ``None``: off.
        pbt_fraction, pbt_explore, pbt_perturb: as ``fraction``, ``explore`` and ``perturb`` of
            :func:`functrain.step.pbt.exploit_and_explore`.
        early_stopping_patience, early_stopping_threshold: HF's ``EarlyStoppingCallback`` per
            member: a member whose ``metric_for_best_model`` did not improve by more than the
            threshold for ``patience`` evaluations stops (its state no longer changes; it still
            runs inside the one vmapped step). Training ends when every member has stopped. A
            member that PBT overwrites starts again with fresh patience.
        callbacks: ``TrainerCallback`` s getting HF's events in the Trainer's order, with per-member
            metrics as ``member_{i}/{key}`` next to the members' mean under HF's key
            (:mod:`functrain.trainer.population_loop`); an ``EarlyStoppingCallback`` among them
            is applied per member (as ``early_stopping_patience``/``early_stopping_threshold``).
    """

    def __init__(self, trainer, population: int | Sequence[dict], *, pbt_interval: int | None = None,
                 pbt_fraction: float = 0.25, pbt_explore: Sequence[str] = ("learning_rate",),
                 pbt_perturb: Sequence[float] = (0.8, 1.2), early_stopping_patience: int | None = None,
                 early_stopping_threshold: float = 0.0, callbacks: Sequence | None = None):
        a = trainer.args
        if isinstance(population, int):
            if population < 1:
                raise ValueError(f"population must be >= 1, got {population}")
            population = [{"seed": a.seed + i} for i in range(population)]
        self.members = [dict(m) for m in population]
        for i, m in enumerate(self.members):
            bad = sorted(set(m) - set(TENSOR_HYPERPARAMETERS))
            if bad:
                raise P.PopulationError(
                    f"member {i}: {bad} cannot vary inside one vmapped graph; a population may vary only "
                    f"{list(TENSOR_HYPERPARAMETERS)}. Run such trials one by one (Trainer.hyperparameter_search "
                    "without population=True)")
        self._check_optimizer_and_schedule(trainer)
        _check_dropout(trainer.model, self.members)
        _check_report_to(a.report_to)
        self._check_pbt(trainer, pbt_interval, pbt_explore)
        self.callback_handler, stopping = population_loop.callback_handler(trainer, callbacks)
        if stopping is not None:  # HF's EarlyStoppingCallback: its rule, applied per member
            early_stopping_patience, early_stopping_threshold = _early_stopping_from_callback(
                stopping, early_stopping_patience, early_stopping_threshold)
        _check_early_stopping(trainer, early_stopping_patience)
        self.trainer = trainer
        self.pbt_interval, self.pbt_fraction = pbt_interval, pbt_fraction
        self.pbt_explore, self.pbt_perturb = tuple(pbt_explore), tuple(pbt_perturb)
        self.early_stopping_patience, self.early_stopping_threshold = early_stopping_patience, early_stopping_threshold
        self.state = None
        self._buffers = "stacked"  # "shared" for adapters over one frozen base (see _create)
        self.log_history: list[dict] = []
        self.pbt_schedule: list[dict] = []
        self._tb_writers: dict[int, object] = {}
        self.control = TrainerControl()
        self.trainer_state = TrainerState()  # HF's bookkeeping of the latest train() (callbacks get it)
        self.control = self.callback_handler.on_init_end(a, self.trainer_state, self.control)

    # -- validation ---------------------------------------------------------------------------
    def _check_optimizer_and_schedule(self, trainer) -> None:
        a = trainer.args
        if trainer.optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
            raise P.PopulationError("PopulationTrainer builds each member's optimizer from args.optim (its "
                                    "hyperparameters must be tensors in the state); a Trainer given optimizers=... "
                                    "or optimizer_cls_and_kwargs=... cannot be a population: set args.optim instead")
        if a.optim in registry.POPULATION_REFUSED:
            raise P.PopulationError(f"optim={a.optim!r} cannot train as a population: "
                                    f"{registry.POPULATION_REFUSED[a.optim]}; use one of "
                                    f"{list(registry.POPULATION_OPTIMIZERS)} or train the runs one by one")
        if a.optim not in registry.POPULATION_OPTIMIZERS:
            raise P.PopulationError(f"PopulationTrainer supports optim in {list(registry.POPULATION_OPTIMIZERS)}, "
                                    f"got optim={a.optim!r}")
        warmups = {i: m["warmup_steps"] for i, m in enumerate(self.members) if "warmup_steps" in m}
        if len(set(warmups.values()) | ({a.warmup_steps} if len(warmups) < len(self.members) else set())) > 1 \
                and a.lr_scheduler_type != "linear":
            raise P.PopulationError(f"members {sorted(warmups)} set different warmup_steps; a warmup length that "
                                    f"varies per member needs lr_scheduler_type='linear', got "
                                    f"{a.lr_scheduler_type!r} (keep warmup_steps equal across members)")
        if a.optim.startswith("schedule_free") and warmups and len(set(warmups.values())) + (
                len(warmups) < len(self.members)) > 1:
            raise P.PopulationError(f"optim={a.optim!r} takes its warmup as a Python int (schedule-free's own warmup, "
                                    f"HF's warmup_steps), so it cannot vary per member: members {sorted(warmups)} set "
                                    "warmup_steps; give every member the same warmup_steps (or set it in the args)")
        absolute = [k for k in _ABSOLUTE_LR_SETTINGS if k in (a.lr_scheduler_kwargs or {})]
        if absolute and any("learning_rate" in m for m in self.members):
            raise P.PopulationError(f"lr_scheduler_kwargs {absolute} are absolute learning rates, which cannot follow "
                                    "a learning rate that varies per member; use min_lr_rate (a ratio) instead")

    def _check_pbt(self, trainer, interval, explore) -> None:
        if interval is None:
            return
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"pbt_interval must be a positive int (steps between exploit/explore rounds), got "
                             f"{interval!r}")
        if trainer.eval_dataset is None:
            raise ValueError("pbt_interval needs an eval_dataset on the trainer: members are ranked by an evaluation")
        if len(self.members) < 2:
            raise ValueError("population-based training needs at least 2 members")
        unknown = [k for k in explore if k not in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                                                    "adam_epsilon")]
        if unknown:
            raise ValueError(f"pbt_explore {unknown}: PBT can perturb learning_rate, weight_decay, adam_beta1, "
                             "adam_beta2 or adam_epsilon")

    # -- building -----------------------------------------------------------------------------
    def _hyperparams(self, member: dict, max_steps: int) -> dict:
        a = self.trainer.args
        return dict(learning_rate=member.get("learning_rate", a.learning_rate),
                    weight_decay=member.get("weight_decay", a.weight_decay),
                    adam_beta1=member.get("adam_beta1", a.adam_beta1), adam_beta2=member.get("adam_beta2", a.adam_beta2),
                    adam_epsilon=member.get("adam_epsilon", a.adam_epsilon),
                    num_warmup_steps=member.get("warmup_steps", a.get_warmup_steps(max_steps)))

    def _tx_factory(self, max_steps: int, hps: list[dict]):
        t, a = self.trainer, self.trainer.args

        extra = registry.parse_optim_args(a.optim_args)
        warmup_varies = len({h["num_warmup_steps"] for h in hps}) > 1
        given = {m["warmup_steps"] for m in self.members if "warmup_steps" in m}
        warmup_steps = next(iter(given)) if len(given) == 1 and len(hps) == sum("warmup_steps" in m
                                                                                   for m in self.members) else None

        def schedule_for(learning_rate, num_warmup_steps):
            if warmup_varies:  # a tensor warmup length: HF's linear schedule reading tensors
                return P.warmup_linear(learning_rate, num_warmup_steps, max_steps)
            # HF schedules are the peak learning rate times a factor of the step: the factor is
            # the Trainer's schedule at peak 1, the peak is the member's tensor.
            unit = get_schedule(a.lr_scheduler_type, 1.0, num_training_steps=max_steps,
                                num_warmup_steps=int(num_warmup_steps), **(a.lr_scheduler_kwargs or {}))
            return lambda count: learning_rate * unit(count)

        decay_names = t.get_decay_parameter_names(t.model)  # (a Trainer subclass may choose them)

        def member_optimizer(learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon, num_warmup_steps):
            # warmup_steps: what schedule-free optimizers read (HF hands them args.warmup_steps);
            # a member's own when it sets one (equal across members: checked at construction).
            view = _MemberArgs(a, learning_rate=learning_rate, weight_decay=weight_decay, adam_beta1=adam_beta1,
                               adam_beta2=adam_beta2, adam_epsilon=adam_epsilon,
                               warmup_steps=warmup_steps if warmup_steps is not None else a.warmup_steps)
            return registry.build_optimizer(view, t.model, schedule_for(learning_rate, num_warmup_steps), extra,
                                            decay_names)

        return inject_hyperparams(member_optimizer, static_args=() if warmup_varies else ("num_warmup_steps",))

    def _create(self, max_steps: int):
        t = self.trainer
        model_init = t.model_init or _copy_of(t.model)
        hps = [self._hyperparams(m, max_steps) for m in self.members]
        seeds = [m.get("seed", t.args.seed) for m in self.members]
        if is_peft_model(t.model) and t.model_init is None:
            # N adapters over the one frozen base (a copy per member would copy the base N times).
            self._buffers = "shared"
            state, tx = adapter_population.create_adapter_population(t.model, self._tx_factory(max_steps, hps), hps,
                                                                     seeds=seeds)
        else:
            try:
                state, tx = P.create_population(model_init, self._tx_factory(max_steps, hps), hps, seeds=seeds)
            except P.PopulationError as e:
                raise P.PopulationError(f"{e}{self._member_named_in(str(e))}") from e
        return self._with_dropout(state), tx

    def _member_named_in(self, message: str) -> str:
        """`` (member 1 is {...})``: the hyperparameters of the member an error names, if one."""
        named = [int(i) for i in re.findall(r"in member (\d+)", message)]
        i = max(named, default=0)  # "member 0" is the reference the others are compared with
        if i == 0 or i >= len(self.members):
            return ""
        return (f" (member {i} is {self.members[i]}, member 0 is {self.members[0]}: model_init built models of "
                "different shapes for them)")

    def _with_dropout(self, state):
        """Each member's ``dropout`` in the ``p`` buffers of the model's tensor Dropout modules
        (members without one keep the module's own ``p``)."""
        if not any("dropout" in m for m in self.members) or self._buffers == "shared":
            return state
        buffers = dict(state.buffers)
        for name in P.dropout_buffers(self.trainer.model):
            default = buffers[name]
            buffers[name] = torch.stack([torch.as_tensor(float(m["dropout"]), dtype=default.dtype,
                                                         device=default.device) if "dropout" in m else default[i]
                                         for i, m in enumerate(self.members)])
        return state.replace(buffers=buffers)

    def _max_steps(self, loader) -> tuple[int, int]:
        a = self.trainer.args
        steps_per_epoch = max(len(loader), 1)
        return steps_per_epoch, a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)

    # -- training -----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Train all members for ``max_steps`` (or ``num_train_epochs``); return ``{"train_loss": [N]}``.

        ``resume_from_checkpoint``: a ``checkpoint-N`` folder written by this driver, or ``True``
        for the latest one in ``output_dir``; training continues bitwise as if uninterrupted.
        """
        t = self.trainer
        loader = compat.as_train_loader(t.get_train_dataloader())
        steps_per_epoch, max_steps = self._max_steps(loader)
        state, tx = self._create(max_steps)
        path = self._resume_path(resume_from_checkpoint)
        self.state, loop = population_loop.train(self, loader, steps_per_epoch, max_steps, state, tx, path)
        self.trainer_state, self.control = loop.state, loop.control
        done = loop.state.global_step
        return {"train_loss": (loop.acc["total"] / max(done, 1)).tolist(), "global_step": done}

    def _accumulation(self, window) -> int:
        """Microbatches of a window: the arguments', or 1 for a last window they do not divide."""
        k = self.trainer.args.gradient_accumulation_steps
        return k if batch_size_of(window) % k == 0 else 1

    def _step(self, steps: dict, tx, state, window, k: int):
        t, a = self.trainer, self.trainer.args
        if k not in steps:
            steps[k] = P.make_population_train_step(t.model, tx, t._train_loss_fn(), accumulate=k,
                                                    precision=a.precision, max_grad_norm=a.max_grad_norm or None,
                                                    compile=a.torch_compile, buffers=self._buffers)
        return steps[k](state, window)

    # -- per-member logging -------------------------------------------------------------------
    def _log_members(self, step: int, loss: torch.Tensor, metrics: dict) -> list[dict]:
        lrs = metrics.get("learning_rate")
        rows = [{"loss": float(loss[i]), **({"learning_rate": float(lrs[i])} if lrs is not None else {})}
                for i in range(len(self.members))]
        self._log_rows(step, rows)
        return rows

    def _log_rows(self, step: int, rows: list[dict]) -> None:
        """One entry per member (``{"member": i, "step": step, **metrics}``), kept and written as JSONL."""
        entries = [{"member": i, "step": step, **row} for i, row in enumerate(rows)]
        self.log_history.extend(entries)
        _append_jsonl(os.path.join(self.trainer.args.output_dir, LOG_FILE), entries)
        if "tensorboard" in (self.trainer.args.report_to or []):
            for i, row in enumerate(rows):
                self._tensorboard_row(i, step, row)

    def _tensorboard_row(self, member: int, step: int, row: dict) -> None:
        """Member i's scalars under ``logging_dir/member-i`` (one run, hence one series, per member),
        with HF's tag names (``train/loss``, ``eval/loss``)."""
        if member not in self._tb_writers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writers[member] = SummaryWriter(os.path.join(self.trainer.args.logging_dir, f"member-{member}"))
        writer = self._tb_writers[member]
        for tag, value in rewrite_logs(row).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(tag, value, step)
        writer.flush()

    def _close_writers(self) -> None:
        for writer in self._tb_writers.values():
            writer.close()
        self._tb_writers = {}

    def _rewrite_logs(self) -> None:
        out = self.trainer.args.output_dir
        for name, entries in ((LOG_FILE, self.log_history), (PBT_FILE, self.pbt_schedule)):
            path = os.path.join(out, name)
            if os.path.exists(path):
                os.remove(path)
            _append_jsonl(path, entries)

    # -- population-based training ------------------------------------------------------------
    def _scores(self, results: list[dict], what: str) -> tuple[torch.Tensor, bool]:
        """``(scores, greater_is_better)`` of ``metric_for_best_model`` (default ``eval_loss``), as HF."""
        a = self.trainer.args
        metric = a.metric_for_best_model or "loss"
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        missing = [i for i, r in enumerate(results) if key not in r]
        if missing:
            raise KeyError(f"{what} ranks members by {key!r} (metric_for_best_model), which members {missing}'s "
                           f"evaluation lacks; it has {sorted(results[missing[0]])}")
        greater = bool(a.greater_is_better) if a.greater_is_better is not None else not key.endswith("loss")
        return torch.tensor([float(r[key]) for r in results], dtype=torch.float64), greater

    def _update_stopping(self, acc: dict, results: list[dict]) -> dict:
        """HF's EarlyStoppingCallback rule per member: patience counts evaluations without an
        improvement larger than the threshold; at ``patience`` the member stops."""
        scores, greater = self._scores(results, "early stopping")
        best = acc["best"]
        gain = (scores - best) if greater else (best - scores)
        improved = torch.isnan(best) | (gain > self.early_stopping_threshold)
        patience = torch.where(improved, torch.zeros_like(acc["patience"]), acc["patience"] + 1)
        active = acc["active"] & (patience < self.early_stopping_patience)
        return {**acc, "best": torch.where(improved & acc["active"], scores.float(), best), "patience": patience,
                "active": active}

    def _pbt_round(self, state, step: int, results: list[dict], acc: dict):
        a = self.trainer.args
        scores, greater = self._scores(results, "PBT")
        # The key is a pure function of the seed and the step: same seed, same copy schedule (also after resuming).
        round_key = rnglib.fold_in(rnglib.key(a.seed), step)
        state, decision = pbt.exploit_and_explore(state, scores, round_key, fraction=self.pbt_fraction,
                                                  explore=self.pbt_explore, perturb=self.pbt_perturb,
                                                  greater_is_better=greater, buffers=self._buffers)
        entry = {"step": step, "copies": {str(d): s for d, s in decision.copies().items()},
                 "scores": scores.tolist(),
                 "factors": {k: v.tolist() for k, v in decision.factors.items()},
                 "hyperparameters": self._current_hyperparameters(state)}
        self.pbt_schedule.append(entry)
        _append_jsonl(os.path.join(a.output_dir, PBT_FILE), [entry])
        # An overwritten member is a new lineage: it trains again, with fresh patience.
        fresh = decision.sources != torch.arange(len(self.members))
        acc = {**acc, "active": acc["active"] | fresh, "patience": torch.where(fresh, 0, acc["patience"]),
               "best": torch.where(fresh, math.nan, acc["best"])}
        return state, acc

    @staticmethod
    def _current_hyperparameters(state) -> dict:
        return {k: v.tolist() for k, v in pbt.injected_hyperparams(state.opt_state).items()}

    def member_hyperparameters(self) -> list[dict]:
        """Each member's hyperparameters now (PBT changes them), read from the state."""
        if self.state is None:
            raise RuntimeError("call train() first")
        values = self._current_hyperparameters(self.state)
        return [{k: v[i] for k, v in values.items()} for i in range(len(self.members))]

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, state, acc: dict, step: int, extra: dict | None = None) -> str:
        a = self.trainer.args
        path = ck.checkpoint_path(a.output_dir, step)
        os.makedirs(path, exist_ok=True)
        tensors = {f"state.{k}": v.detach().contiguous().clone() for k, v in tree.named_leaves(state).items()}
        tensors.update({f"driver.{k}": v.contiguous().clone() for k, v in acc.items()})
        save_file(tensors, os.path.join(path, STATE_FILE))
        meta = {"global_step": step, "members": self.members, "pbt_schedule": self.pbt_schedule,
                "log_history": self.log_history, **(extra or {})}
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        ck.rotate_checkpoints(a.output_dir, a.save_total_limit)
        return path

    def _resume_path(self, resume_from_checkpoint) -> str | None:
        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is True:
            found = [p for _, p in ck.checkpoint_dirs(self.trainer.args.output_dir)
                     if os.path.exists(os.path.join(p, STATE_FILE))]
            if not found:
                raise ValueError(f"resume_from_checkpoint=True but {self.trainer.args.output_dir!r} holds no "
                                 f"population checkpoint (checkpoint-N/{STATE_FILE})")
            return found[-1]
        path = os.fspath(resume_from_checkpoint)
        if not os.path.exists(os.path.join(path, STATE_FILE)):
            raise ValueError(f"{path!r} is not a population checkpoint: it has no {STATE_FILE}")
        return path

    def _load_checkpoint(self, path: str, template, acc: dict):
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        if meta["members"] != self.members:
            raise ValueError(f"checkpoint {path!r} was written for members {meta['members']}, this trainer has "
                             f"{self.members}")
        tensors = load_file(os.path.join(path, STATE_FILE))
        leaves, treedef = tree.flatten(template)
        names = tree.paths(template)
        state = tree.unflatten(treedef, [tensors[f"state.{k}"].to(x.device) for k, x in zip(names, leaves)])
        acc = {k: tensors[f"driver.{k}"] for k in acc}
        self.pbt_schedule, self.log_history = meta["pbt_schedule"], meta["log_history"]
        return state, acc, meta["global_step"], meta

    # -- saving a member ----------------------------------------------------------------------
    def save_model(self, member: int, output_dir: str | None = None) -> str:
        """Write member ``member``'s weights (safetensors), config and processing class to
        ``output_dir`` (default ``output_dir/member-<i>``), loadable by ``from_pretrained``."""
        if self.state is None:
            raise RuntimeError("call train() first")
        n = len(self.members)
        if not isinstance(member, int) or not 0 <= member < n:
            raise IndexError(f"member must be an int in [0, {n}), got {member!r}")
        t = self.trainer
        output_dir = output_dir or os.path.join(t.args.output_dir, f"member-{member}")
        one = self.member_states()[member]
        model = copy.deepcopy(t.model)
        missing, _ = model.load_state_dict({**one.params, **one.buffers}, strict=False)
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(one.params)
        if set(missing) - tied - set(one.buffers):
            raise ValueError(f"member {member}'s state lacks model tensors {sorted(set(missing) - tied)[:5]}")
        ck.write_model(model, output_dir, processing_class=t.processing_class)
        return output_dir

    def member_states(self):
        """The N trained members as ordinary :class:`TrainState` s."""
        if self.state is None:
            raise RuntimeError("call train() first")
        return P.unstack_state(self.state, buffers=self._buffers)

    def save_member_adapters(self, output_dir: str | None = None) -> list[str]:
        """PEFT members: each trained adapter as its own folder ``output_dir/member-{i}`` (adapter files
        as ``save_model`` writes them, loadable by ``PeftModel.from_pretrained``)."""
        if self.state is None:
            raise RuntimeError("call train() first")
        if self._buffers != "shared":
            raise TypeError("save_member_adapters needs a population of peft adapters (a PeftModel given to the "
                            "Trainer without model_init); save other members from member_states()")
        return adapter_population.save_member_adapters(self.trainer.model, self.state,
                                                       output_dir or self.trainer.args.output_dir)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> list[dict]:
        """Per member: ``{prefix}_loss`` (mean over the items of the eval set) and ``compute_metrics``."""
        if self.state is None:
            raise RuntimeError("call train() first")
        return self._evaluate_state(self.state, eval_dataset, metric_key_prefix)

    def _evaluate_state(self, state, eval_dataset=None, metric_key_prefix: str = "eval", on_batch=None) -> list[dict]:
        t = self.trainer
        state = _state_for_eval(state, t.args.optim)
        loader = t.get_eval_dataloader(eval_dataset)
        with_outputs = t.compute_metrics is not None
        step = P.make_population_eval_step(t.model, t._eval_loss_fn(), precision=t.args.precision,
                                           return_outputs=with_outputs, buffers=self._buffers)
        loss_sum, items, outputs, labels = 0.0, 0, [], []
        for batch in loader:
            out = step(state, batch)
            if on_batch is not None:
                on_batch()  # HF's on_prediction_step
            loss_sum = loss_sum + out["loss"].double() * out["num_items"]
            items = items + out["num_items"]
            if with_outputs:
                outputs.append(out["outputs"].detach().float().numpy())
                labels.append(batch["labels"].numpy())
        losses = (loss_sum / items).tolist()
        results = []
        for i, loss in enumerate(losses):
            metrics = {f"{metric_key_prefix}_loss": loss}
            if with_outputs:
                preds = pad_and_concatenate([o[i] for o in outputs])
                extra = t.compute_metrics(EvalPrediction(preds, pad_and_concatenate(labels)))
                metrics.update({k if k.startswith(metric_key_prefix + "_") else f"{metric_key_prefix}_{k}": v
                                for k, v in extra.items()})
            results.append(metrics)
        return results


def _check_dropout(model, members: list[dict]) -> None:
    """A ``dropout`` per member needs dropout probabilities held as tensors (buffers of
    :class:`functrain.population.Dropout`); ``nn.Dropout`` bakes its float ``p`` into the graph."""
    varying = [i for i, m in enumerate(members) if "dropout" in m]
    if not varying:
        return
    for i in varying:
        p = members[i]["dropout"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"member {i}: dropout must be a probability in [0, 1], got {p!r}")
    if is_peft_model(model):
        raise P.PopulationError(f"member {varying[0]} sets dropout, but the members of a peft population share the "
                                "frozen base model's buffers, so a dropout probability cannot differ per member")
    if P.dropout_buffers(model):
        return
    floats = P.float_dropouts(model)
    held = (f"holds its dropout probabilities as Python floats ({dict(list(floats.items())[:3])}), which one vmapped "
            "graph shares" if floats else "has no dropout modules")
    raise P.PopulationError(
        f"member {varying[0]} sets dropout={members[varying[0]]['dropout']}, but {type(model).__name__} {held}. A "
        "per-member dropout needs its probability as a tensor in the state: build the model with "
        "functrain.population.Dropout, or wrap model_init with functrain.population.use_tensor_dropout (replaces "
        "nn.Dropout modules; dropout applied functionally, as in many transformers attention layers, stays a float); "
        "else vary dropout across separate runs")


def _check_report_to(report_to) -> None:
    other = [r for r in (report_to or []) if r != "tensorboard"]
    if other:
        raise ValueError(f"PopulationTrainer logs one series per member to TensorBoard (report_to='tensorboard') "
                         f"and to output_dir/{LOG_FILE}; report_to {other} is not supported for populations: "
                         "use report_to='none' or 'tensorboard'")


def _check_early_stopping(trainer, patience) -> None:
    if patience is None:
        return
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"early_stopping_patience must be a positive int (evaluations), got {patience!r}")
    strategy = getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)
    if strategy != "steps" or trainer.eval_dataset is None:
        raise ValueError("early_stopping_patience needs evaluations during training: eval_strategy='steps' and an "
                         f"eval_dataset on the trainer (got eval_strategy={strategy!r})")


def _early_stopping_from_callback(callback, patience, threshold) -> tuple[int, float]:
    """An ``EarlyStoppingCallback`` in ``callbacks`` is ``early_stopping_patience`` /
    ``early_stopping_threshold``: HF's rule, applied to each member (one member's plateau does
    not stop the others)."""
    if patience is not None and (patience, threshold) != (callback.early_stopping_patience,
                                                           callback.early_stopping_threshold):
        raise ValueError(f"early_stopping_patience={patience} (threshold {threshold}) and an EarlyStoppingCallback("
                         f"{callback.early_stopping_patience}, {callback.early_stopping_threshold}) disagree; give one")
    return callback.early_stopping_patience, callback.early_stopping_threshold


def _state_for_eval(state, optim_name: str):
    """Schedule-free members are evaluated at their averaged ``x``, as the Trainer does (HF's
    ``optimizer.eval()``); other states as they are."""
    if not optim_name.startswith("schedule_free"):
        return state
    with foreach.per_tensor():
        params = torch.func.vmap(schedule_free_eval_params)(state.opt_state, state.params)
    return state.replace(params=params)


class _MemberArgs:
    """The trainer's args with a member's hyperparameters (0-d tensors) in place of the numbers,
    as the registry's optimizer builders read them."""

    def __init__(self, args, **values):
        self._args = args
        vars(self).update(values)

    def __getattr__(self, name):
        return getattr(self._args, name)


def _append_jsonl(path: str, entries: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")


def _copy_of(model):
    def init():
        return copy.deepcopy(model)

    return init


__all__ = ["PopulationTrainer", "TENSOR_HYPERPARAMETERS"]
