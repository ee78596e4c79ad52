"""PopulationTrainer: a Trainer's whole setup, trained as N members in one vmapped step.

It borrows from a :class:`functrain.Trainer` (composition, no subclassing) what does not change
between members: the datasets and loaders, the collator, the loss, ``compute_metrics`` and the
``TrainingArguments``. Members differ in the hyperparameters the state can hold as tensors:

    ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``,
    ``warmup_steps`` and ``seed`` (model init through ``model_init`` and the dropout stream;
    the data order is shared: ``args.data_seed``, else ``args.seed`` of the trainer).

The optimizer is AdamW with HF's linear warmup/decay schedule (``lr_scheduler_type="linear"``,
the HF default), built by :func:`functrain.optim.inject_hyperparams` so every member reads its own
values from its state. Anything else that differs between members is an error. This driver does
the loop only: no checkpoints, callbacks or logging (use :meth:`member_states` to get N ordinary
states, e.g. to save the best one).
"""

from __future__ import annotations

import math
from typing import Sequence

from functrain.adapters.outputs import batch_size_of
from functrain.adapters.peft import is_peft_model
from functrain.core import optim
from functrain.step import population as P
from functrain.trainer import adapter_population, registry
from functrain.trainer.evaluation import EvalPrediction, pad_and_concatenate

TENSOR_HYPERPARAMETERS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                          "warmup_steps", "seed")


class PopulationTrainer:
    """Train and evaluate N variants of ``trainer``'s run at once.

    Args:
        trainer: a :class:`functrain.Trainer` (its ``model_init`` builds each member when given,
            else every member starts from a copy of ``trainer.model``).
        population: ``N`` (members differ by seed: ``args.seed + i``) or a list of dicts of
            :data:`TENSOR_HYPERPARAMETERS` overriding ``trainer.args`` per member.
    """

    def __init__(self, trainer, population: int | Sequence[dict]):
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
        if a.optim not in registry.POPULATION_OPTIMIZERS or a.lr_scheduler_type not in registry.POPULATION_SCHEDULES:
            supported = " or ".join(f"lr_scheduler_type={n!r}" for n in registry.POPULATION_SCHEDULES)
            raise P.PopulationError(f"PopulationTrainer supports optim in {list(registry.POPULATION_OPTIMIZERS)} with "
                                    f"{supported}, got optim={a.optim!r}, lr_scheduler_type={a.lr_scheduler_type!r}")
        self.trainer = trainer
        self.state = None
        self._buffers = "stacked"  # "shared" for adapters over one frozen base (see _create)

    # -- building -----------------------------------------------------------------------------
    def _hyperparams(self, member: dict, max_steps: int) -> dict:
        a = self.trainer.args
        warmup = member.get("warmup_steps", a.get_warmup_steps(max_steps))
        return dict(learning_rate=member.get("learning_rate", a.learning_rate),
                    weight_decay=member.get("weight_decay", a.weight_decay),
                    b1=member.get("adam_beta1", a.adam_beta1), b2=member.get("adam_beta2", a.adam_beta2),
                    eps=member.get("adam_epsilon", a.adam_epsilon), num_warmup_steps=float(warmup))

    def _create(self, max_steps: int):
        t = self.trainer
        mask = optim.default_weight_decay_mask(t.model)

        def adamw_linear(learning_rate, weight_decay, b1, b2, eps, num_warmup_steps):
            schedule = P.warmup_linear(learning_rate, num_warmup_steps, max_steps)
            return optim.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)

        hps = [self._hyperparams(m, max_steps) for m in self.members]
        seeds = [m.get("seed", t.args.seed) for m in self.members]
        if is_peft_model(t.model) and t.model_init is None:
            # N adapters over the one frozen base (a copy per member would copy the base N times).
            self._buffers = "shared"
            return adapter_population.create_adapter_population(t.model, optim.inject_hyperparams(adamw_linear), hps, seeds=seeds)
        model_init = t.model_init or _copy_of(t.model)
        return P.create_population(model_init, optim.inject_hyperparams(adamw_linear), hps, seeds=seeds)

    # -- training -----------------------------------------------------------------------------
    def train(self) -> dict:
        """Train all members for ``max_steps`` (or ``num_train_epochs``); return ``{"train_loss": [N]}``."""
        t, a = self.trainer, self.trainer.args
        loader = t.get_train_dataloader()
        steps_per_epoch = max(len(loader), 1)
        max_steps = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
        state, tx = self._create(max_steps)
        steps, done, total = {}, 0, None
        for epoch in range(math.ceil(max_steps / steps_per_epoch)):
            for window in loader.iter_from(epoch, 0):
                rows = batch_size_of(window)
                acc = a.gradient_accumulation_steps if rows % a.gradient_accumulation_steps == 0 else 1
                if acc not in steps:
                    steps[acc] = P.make_population_train_step(
                        t.model, tx, t._train_loss_fn(), accumulate=acc, precision=a.precision,
                        max_grad_norm=a.max_grad_norm or None, compile=a.torch_compile, buffers=self._buffers)
                state, metrics = steps[acc](state, window)
                total = metrics["loss"] if total is None else total + metrics["loss"]
                done += 1
                if done >= max_steps:
                    break
            if done >= max_steps:
                break
        self.state = state
        return {"train_loss": (total / max(done, 1)).tolist(), "global_step": done}

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
        return adapter_population.save_member_adapters(self.trainer.model, self.state, output_dir or self.trainer.args.output_dir)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> list[dict]:
        """Per member: ``{prefix}_loss`` (mean over the items of the eval set) and ``compute_metrics``."""
        if self.state is None:
            raise RuntimeError("call train() first")
        t = self.trainer
        loader = t.get_eval_dataloader(eval_dataset)
        with_outputs = t.compute_metrics is not None
        step = P.make_population_eval_step(t.model, t._eval_loss_fn(), precision=t.args.precision,
                                           return_outputs=with_outputs, buffers=self._buffers)
        loss_sum, items, outputs, labels = 0.0, 0, [], []
        for batch in loader:
            out = step(self.state, batch)
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


def _copy_of(model):
    import copy

    def init():
        return copy.deepcopy(model)

    return init


__all__ = ["PopulationTrainer", "TENSOR_HYPERPARAMETERS"]
