"""The Trainer: the Hugging Face ``Trainer`` API over the one training loop, :func:`functrain.runner.run`.

Everything that touches the training state happens in ``train_step(state, batch)`` (see
:mod:`functrain.step`); ``train()`` runs it with the runner, whose hooks
(:mod:`functrain.trainer.train_hooks`) feed it windows of data, fire HF's callback events, read
its metric tensors on logging steps, run evaluations and write checkpoints. Resume is exact: the
checkpoint holds the whole ``TrainState`` (params, optimizer state, step, rng key, loss scale),
the data position and the global generators, and the loader starts at the next window without
replaying earlier ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import itertools
import json
import logging
import math
import os
import random
import signal
import time
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from functrain.adapters import outputs as hf_outputs
from functrain.io import checkpoint as ck
from functrain.io import run_dir
from functrain.data import stream as data_stream
from functrain.parallel import distributed as fd
from functrain.core import optim
from functrain.trainer import compat
from functrain.trainer.callbacks import (
    CallbackHandler, DefaultFlowCallback, ExportableState, PrinterCallback, ProgressCallback, TrainerControl,
    TrainerState,
)
from functrain.core.optim import hf_names
from functrain.trainer import registry, sharded_start
from functrain.trainer.arg_effects import compile_kwargs, set_log_level
from functrain.trainer.integrations import integration_callbacks
from functrain.trainer.logging import MetricsFileCallback
from functrain.trainer.memory import MemoryTracker
from functrain.trainer.publish import PublishMixin
from functrain.trainer.train_hooks import (
    CallbackHook, ControlFlow, TrainerCheckpoint, TrainerEvaluate, TrainerLog, TrainWindows, num_rows,
)
from functrain.runner import run
from functrain.core.state import TrainState
from functrain.trainer.args import TrainingArguments

logger = logging.getLogger("functrain")


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class PredictionOutput(NamedTuple):
    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (as ``transformers.set_seed``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_full_determinism(seed: int) -> None:
    """``full_determinism=True``: seed, and make every kernel deterministic, as
    ``transformers.enable_full_determinism`` does (process-wide, for the rest of the process).

    The train and eval steps are built with ``deterministic=True`` too, so a compiled step is
    compiled in the same mode (see :func:`functrain.make_train_step`).
    """
    set_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Trainer(PublishMixin):
    """Train, evaluate and predict with the Hugging Face ``Trainer`` arguments.

    Differences from transformers: ``optimizers`` takes a functrain ``GradientTransformation`` (with
    its schedule inside), not a ``torch.optim.Optimizer``; checkpoints are safetensors + JSON only;
    callbacks also receive ``train_state`` (read-only; the Trainer donates each state to the next step,
    so its tensors are the module's and a state kept past its step raises ``ConsumedStateError``:
    keep values, e.g. clones, not the state). Subclasses overriding ``compute_loss`` work:
    the override becomes the step's loss function.

    ``streaming_metrics`` (functrain only): ``fn(batch, outputs) -> {name: metric}`` of mergeable
    metrics (:mod:`functrain.metrics`, e.g. ``Accuracy.from_logits``), merged batch by batch during
    ``evaluate()``/``predict()``, so evaluation memory stays at one batch's worth, however large
    the eval set (``compute_metrics`` keeps every prediction on the host until the end).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 model_init=None, compute_loss_func=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 streaming_metrics=None):
        self.args = args if args is not None else TrainingArguments("trainer_output")
        if not isinstance(self.args, TrainingArguments):
            raise TypeError(f"args must be a functrain.TrainingArguments, got {type(self.args).__name__}")
        registry.check_subclass_overrides(type(self), Trainer)
        self.optimizer_cls_and_kwargs = registry.check_optimizer_cls_and_kwargs(optimizer_cls_and_kwargs)
        self.is_in_train = False  # True while train() runs (transformers' attribute)
        if self.optimizer_cls_and_kwargs is not None and optimizers[0] is not None:
            raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible.")
        self._memory_tracker = MemoryTracker(self.args.skip_memory_metrics)
        self._memory_tracker.start("init")
        set_log_level(self.args)
        # Joins the process group when launched by torchrun / accelerate (no-op for one process).
        self.dist = fd.init_distributed(self.args.ddp_backend, datetime.timedelta(seconds=self.args.ddp_timeout),
                                        cpu=self.args.use_cpu)
        (enable_full_determinism if self.args.full_determinism else set_seed)(self.args.seed)
        self.model_init = model_init
        self._meta_start = None
        self._first_shards = None
        if model is None:
            if model_init is None:
                raise ValueError("Trainer needs a model or a model_init function")
            # Sharded: built on the meta device, each rank materializes its shards only.
            model, self._meta_start = sharded_start.build(model_init, self.args.sharded)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._meta_start is None:  # a model given on the meta device: sharded, or refused
            self._meta_start = sharded_start.adopt(model, self.args.sharded)
        self.model = self._place(model)
        _check_peft(model, self.args)
        self.optimizer, self.lr_scheduler = _check_optimizers(optimizers)
        if self.args.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset; pass one or set "
                             "eval_strategy='no'")
        if self.args.load_best_model_at_end and eval_dataset is None:
            raise ValueError("load_best_model_at_end=True needs an eval_dataset")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.data_collator = data_collator if data_collator is not None else _default_collator(processing_class)
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.streaming_metrics = streaming_metrics
        if self.args.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError("gradient_checkpointing=True but the model has no gradient_checkpointing_enable()")
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs or {"use_reentrant": False})
        default = [DefaultFlowCallback, MetricsFileCallback] + integration_callbacks(self.args.report_to)
        self.callback_handler = CallbackHandler(default + list(callbacks or []), model, processing_class)
        if fd.is_main_process():  # progress and prints on the main process only
            self.callback_handler.add_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        self.state = self._mark_process(TrainerState())
        self.control = TrainerControl()
        self.train_state: TrainState | None = None
        self.interrupted: signal.Signals | None = None  # the signal that stopped the last train(), if one did
        self._eval_steps: dict = {}
        self._eval_ignore_keys = None  # set per evaluate()/predict() call
        self._tx: optim.GradientTransformation | None = None  # the optimizer of the current train()
        self._train_steps: dict = {}  # compiled train steps of the current train(), by microbatch count
        self._train_log: TrainerLog | None = None  # the logging hook of the current train()
        self._flos = 0.0  # FLOPs counted since the last store_flos()
        self._counted_parameters = (None, None)  # (weak reference to the model, its non-embedding parameter count)
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        if self.args.push_to_hub:
            self.init_hf_repo()
        self._memory_tracker.stop("init")

    def _place(self, model: nn.Module) -> nn.Module:
        """The model on ``args.device`` (this rank's GPU, or the CPU with ``use_cpu``), as transformers
        does; a model spread over several devices (``hf_device_map``) or a meta skeleton stays."""
        if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1 or sharded_start.is_meta(model):
            return model
        return model.to(self.args.device)

    # -- callbacks ------------------------------------------------------------------------------
    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    # -- data -----------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, description: str):
        if self.args.remove_unused_columns:
            from functrain.data.columns import remove_unused_columns

            dataset = remove_unused_columns(dataset, self.model, self.label_names)
        return dataset

    @property
    def label_names(self) -> list[str]:
        """``args.label_names``, else the model's forward arguments naming labels (HF's ``find_labels``:
        ``labels``, ``start_positions``/``end_positions`` for QA, ...)."""
        return hf_outputs.label_names_of(self.model, self.args.label_names)

    def _required_label_keys(self) -> list[str]:
        """Batch keys the training loss cannot do without (empty when a custom loss decides)."""
        if self._overrides("compute_loss") or self._overrides("training_step"):
            return []  # a user's compute_loss / training_step may need anything, or nothing
        if self.compute_loss_func is not None:
            return ["labels"]  # compute_loss pops them for compute_loss_func
        if self.args.label_names is not None:
            return list(self.args.label_names)
        if "return_loss" in hf_outputs.forward_parameters(self.model):  # CLIP-style: a loss without labels
            return []
        names = self.label_names
        return ["labels"] if "labels" in names else names

    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Trainer, method)

    def _check_first_batch(self, dataset) -> None:
        """Collate the first training batch once, before anything runs (no state, no callbacks, no
        files), so a text column, ragged lists or missing labels fail with a message naming the
        column instead of inside the first step. Random state is restored afterwards, so a collator
        that draws random numbers (MLM masking) leaves training unchanged."""
        from functrain.data.loader import has_length

        if dataset is None:  # a subclass's loader of ready batches: nothing to collate here
            return
        n = self.args.per_device_train_batch_size
        if has_length(dataset):
            examples = [dataset[i] for i in range(min(n, len(dataset)))]
        else:
            examples = list(itertools.islice(iter(dataset), n))
        if not examples:
            raise ValueError(f"the train_dataset ({type(self.train_dataset).__name__}) produced no examples; "
                             "nothing to train on")
        py_state, np_state = random.getstate(), np.random.get_state()
        own = getattr(self.data_collator, "generator", None)  # e.g. a seeded MLM collator's generator
        own_state = own.get_state() if isinstance(own, torch.Generator) else None
        # transformers' seeded collators create their generator on the first call: make it again then
        lazily_seeded = own is None and getattr(self.data_collator, "seed", None) is not None
        with torch.random.fork_rng(devices=[]):
            try:
                batch = self.data_collator(examples)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
                if own_state is not None:
                    own.set_state(own_state)
                elif lazily_seeded:
                    self.data_collator.generator = None
        if not isinstance(batch, Mapping):
            raise TypeError(f"the data_collator must return a dict of tensors, got {type(batch).__name__}")
        _warn_keys_into_kwargs(self.model, batch, self._custom_loss())
        missing = [k for k in self._required_label_keys() if k not in batch]
        if missing:
            raise ValueError(
                f"the training batches have no {missing[0]!r}, which {type(self.model).__name__}'s loss needs; "
                f"keys present after collation: {sorted(batch)}. Add a 'labels' (or 'label') column, use a "
                "collator that builds labels (e.g. DataCollatorForLanguageModeling for causal LMs), set "
                "label_names, or pass compute_loss_func")

    def get_train_dataloader(self):
        """Windows of ``per_device_train_batch_size * gradient_accumulation_steps`` examples.

        One loader batch is one optimizer step; the step splits it into microbatches. Its order is a
        pure function of ``(data_seed or seed, epoch)``, so ``iter_from(epoch, i)`` resumes in O(1).
        """
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        from functrain.data.loader import ResumableLoader, check_not_empty, has_length
        from functrain.trainer.arg_effects import group_lengths, loader_options

        check_not_empty(self.train_dataset, "train_dataset")
        a = self.args
        grouped = a.train_sampling_strategy == "group_by_length" and has_length(self.train_dataset)
        return ResumableLoader(self._prepare_dataset(self.train_dataset, "training"),
                               a.per_device_train_batch_size * a.gradient_accumulation_steps, self.data_collator,
                               seed=a.data_seed if a.data_seed is not None else a.seed,
                               shuffle=a.train_sampling_strategy != "sequential", drop_last=a.dataloader_drop_last,
                               world_size=fd.world_size(), rank=fd.rank(), shard_block=a.per_device_train_batch_size,
                               group_by_length=grouped,
                               lengths=group_lengths(self.train_dataset, a.length_column_name) if grouped else None,
                               **loader_options(a))

    def get_eval_dataloader(self, eval_dataset=None, shard: bool = False):
        """Eval batches in dataset order; ``shard=True`` gives this rank its share (distributed runs)."""
        from functrain.data.loader import ResumableLoader, check_not_empty

        if isinstance(eval_dataset, str):  # a set of the Trainer's dict, by name (as transformers)
            eval_dataset = self._named_eval_set(eval_dataset)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset (pass one to Trainer or to evaluate())")
        check_not_empty(dataset, "eval_dataset")
        world, rank = (fd.world_size(), fd.rank()) if shard else (1, 0)
        from functrain.trainer.arg_effects import loader_options

        return ResumableLoader(self._prepare_dataset(dataset, "evaluation"), self.args.per_device_eval_batch_size,
                               self.data_collator, shuffle=False, drop_last=self.args.dataloader_drop_last,
                               world_size=world, rank=rank, shard_block=self.args.per_device_eval_batch_size,
                               **loader_options(self.args))

    def get_test_dataloader(self, test_dataset):
        return self.get_eval_dataloader(test_dataset)

    # -- optimizer --------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int):
        """The learning-rate schedule for ``lr_scheduler_type`` (a pure function of the step).

        ``reduce_lr_on_plateau`` is a constant rate here; ``create_optimizer`` chains the plateau
        scale onto the optimizer and ``_evaluate`` feeds it (see ``_plateau_settings``).
        """
        from functrain.core.schedules import get_schedule

        a = self.args
        # HF's scheduler scales the optimizer's own rate: optimizer_cls_and_kwargs' lr when given.
        rate = (a.learning_rate if self.optimizer_cls_and_kwargs is None
                else registry.torch_class_learning_rate(*self.optimizer_cls_and_kwargs))
        if a.lr_scheduler_type == "reduce_lr_on_plateau":
            return get_schedule("constant", rate, num_training_steps=num_training_steps)
        return get_schedule(a.lr_scheduler_type, rate, num_training_steps=num_training_steps,
                            num_warmup_steps=a.get_warmup_steps(num_training_steps), **a.lr_scheduler_kwargs)

    def create_optimizer(self, schedule=None):
        """The functrain optimizer for ``args.optim``, or for ``optimizer_cls_and_kwargs`` when given
        (weight decay skips biases and norms, as HF). The schedule is part of it: ``schedule``
        defaults to :meth:`create_scheduler` over this run's number of steps (HF's
        ``create_optimizer()`` takes none, its scheduler being a separate object)."""
        if schedule is None:
            schedule = self.create_scheduler(self._planned_steps())
        decay_names = self.get_decay_parameter_names(self.model)
        if self.optimizer_cls_and_kwargs is not None:
            tx = registry.build_torch_class_optimizer(self.args, self.model, schedule, *self.optimizer_cls_and_kwargs,
                                                      decay_names=decay_names)
        else:
            tx = registry.build_optimizer(self.args, self.model, schedule,
                                          registry.parse_optim_args(self.args.optim_args), decay_names)
        plateau = self._plateau_settings()
        if plateau is not None:
            tx = optim.chain(tx, optim.reduce_on_plateau(**plateau, observe="external"))
        return tx

    def get_decay_parameter_names(self, model) -> list[str]:
        """The names of the parameters weight decay applies to (HF's rule: not biases, not norm
        layers). Override it, as in transformers, to choose others; ``create_optimizer`` reads it."""
        return sorted(optim.decay_parameter_names(model))

    def _plateau_settings(self) -> dict | None:
        """``reduce_on_plateau`` arguments for HF's ``reduce_lr_on_plateau`` (torch's kwargs), else None."""
        a = self.args
        if a.lr_scheduler_type != "reduce_lr_on_plateau":
            return None
        from functrain.core.optim.plateau import TORCH_ARGUMENTS

        unknown = sorted(set(a.lr_scheduler_kwargs) - set(TORCH_ARGUMENTS))
        if unknown:
            raise ValueError(f"lr_scheduler_kwargs {unknown} are not ReduceLROnPlateau arguments; "
                             f"expected some of {list(TORCH_ARGUMENTS)}")
        return optim.plateau_arguments_from_torch(a.learning_rate, **a.lr_scheduler_kwargs)

    def _planned_steps(self) -> int:
        """The number of optimizer steps ``train()`` will take (as it computes it)."""
        a = self.args
        if a.max_steps > 0:
            return a.max_steps
        loader = compat.as_train_loader(self.get_train_dataloader())
        if not hasattr(loader, "__len__") or getattr(loader, "is_iterable", False):
            raise ValueError("the train_dataset has no length (a streaming/iterable dataset): set max_steps")
        return math.ceil(a.num_train_epochs * max(len(loader), 1))

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        if self.optimizer is not None:
            return self.optimizer
        schedule = self.create_scheduler(num_training_steps)
        if inspect.signature(self.create_optimizer).parameters:
            tx = self.create_optimizer(schedule)
        else:  # an override with HF's signature, create_optimizer(self)
            tx = self.create_optimizer()
        if not isinstance(tx, optim.GradientTransformation):
            raise TypeError(f"{type(self).__name__}.create_optimizer returned a {_torch_optim_name(tx)}: functrain needs "
                            "a pure optimizer; return a functrain.optim GradientTransformation (its schedule inside, "
                            "e.g. functrain.optim.adamw(schedule)), or set TrainingArguments.optim")
        return tx

    # -- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one microbatch (mean over its items), as HF's ``compute_loss``.

        Override it in a subclass to change the loss: the override runs inside the pure step with the
        state's params bound to ``model``.
        """
        if self.compute_loss_func is not None and "labels" in inputs:
            labels = inputs.pop("labels")
            outputs = model(**inputs, **hf_outputs.no_cache_kwargs(model, inputs))
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif self.args.label_smoothing_factor > 0 and "labels" in inputs:
            from functrain.step.batch import loss_shifts_labels
            from functrain.trainer.label_smoothing import label_smoothed_loss

            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = label_smoothed_loss(outputs, labels, self.args.label_smoothing_factor,
                                       shift_labels=loss_shifts_labels(self.model))
        else:
            outputs = model(**inputs, **hf_outputs.no_cache_kwargs(model, inputs))
            if isinstance(outputs, Mapping) and outputs.get("loss") is None:
                raise ValueError(f"the model returned no loss (keys: {list(outputs.keys())}); pass labels in the "
                                 "batch or override compute_loss / give compute_loss_func")
            loss = hf_outputs.loss_of(outputs)  # outputs["loss"], or outputs[0] of a tuple
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The loss of one microbatch, as HF's ``training_step`` (an override point).

        functrain differentiates what this returns inside the pure step, so an override returns the
        loss with its graph (the MEAN over the microbatch's items) and calls no ``backward``; the
        step weights microbatches by their item counts, hence ``num_items_in_batch`` is ``None``
        there. The default is ``compute_loss(model, inputs)``.
        """
        if num_items_in_batch is None:  # older compute_loss overrides take no num_items_in_batch
            return self.compute_loss(model, inputs)
        return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """``(loss, logits, labels)`` of one eval batch, as HF's ``prediction_step`` (an override point).

        Runs inside the pure eval step (params bound to ``model``, no grad). The loss is computed
        only when the batch has every one of :attr:`label_names`; ``logits`` are the model outputs
        but the loss and ``ignore_keys`` (default: the config's ``keys_to_ignore_at_inference``);
        ``labels`` a tensor, or a tuple for several label names (QA's start and end positions).
        """
        labels = hf_outputs.labels_of(inputs, self.label_names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = hf_outputs.can_return_loss(model)
        loss_without_labels = not self.label_names and return_loss
        if ignore_keys is None:
            ignore_keys = hf_outputs.ignore_keys_of(self.model)
        if labels is not None or loss_without_labels:
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach().mean()
            logits = hf_outputs.predictions_of(outputs, ignore_keys, has_loss=True)
        else:
            loss = None
            outputs = model(**inputs, **hf_outputs.no_cache_kwargs(model, inputs))
            logits = hf_outputs.predictions_of(outputs, ignore_keys, has_loss=False)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, labels

    def _custom_loss(self) -> bool:
        return (self._overrides("compute_loss") or self._overrides("training_step")
                or self.compute_loss_func is not None or self.args.label_smoothing_factor > 0)

    def _train_loss_fn(self):
        """The step's loss: ``training_step`` (hence ``compute_loss``) when overridden, else the step's
        default (the model's own loss, normalized over the window)."""
        if not self._custom_loss():
            if self.args.use_liger_kernel:  # HF patches Liger's kernels in; the same loss, logits never whole
                from functrain.step.fused_loss import causal_lm_fused_loss

                return causal_lm_fused_loss
            return None

        def loss_fn(m, batch):
            loss = self.training_step(m, dict(batch), None)
            if isinstance(loss, torch.Tensor) and not loss.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{type(self).__name__}.training_step returned a loss without a graph: functrain "
                                 "differentiates the returned loss itself, so return it undetached and do not call "
                                 "backward() in training_step")
            return loss

        return loss_fn

    def _eval_loss_fn(self, with_outputs: bool = True, ignore_keys=None):
        """The eval step's function: :meth:`prediction_step` (HF's rules, or a subclass's override)."""

        def fn(m, batch):
            loss, logits, labels = self.prediction_step(m, dict(batch), not with_outputs, ignore_keys=ignore_keys)
            return loss, {"outputs": logits, "labels": labels}

        return fn

    # -- steps ------------------------------------------------------------------------------------
    def _optimizer_is_leafwise(self) -> bool:
        """Whether the optimizer updates each parameter from its own gradient, state and value alone
        (a given ``optimizers=`` transformation, or one from an overridden ``create_optimizer``, is not
        assumed to)."""
        if self.optimizer is not None or self._overrides("create_optimizer"):
            return False
        if self.optimizer_cls_and_kwargs is not None:
            return hf_names.TORCH_OPTIMIZER_CLASSES[self.optimizer_cls_and_kwargs[0]].leafwise
        return self.args.optim in registry.LEAFWISE_OPTIMIZERS

    def _make_train_step(self, tx, accumulate: int):
        from functrain.step.train import make_train_step

        a = self.args
        return make_train_step(self.model, tx, self._train_loss_fn(), accumulate=accumulate, precision=a.precision,
                               compile=a.torch_compile, compile_kwargs=compile_kwargs(a), donate=self._donates(),
                               leafwise_update=self._optimizer_is_leafwise(), deterministic=a.full_determinism,
                               max_grad_norm=a.max_grad_norm or None, required_keys=self._required_label_keys(),
                               skip_non_finite=not a.fp16,
                               **self._distributed_step_kwargs(accumulate))

    def _donates(self) -> bool:
        """The Trainer owns its state, so its step writes each new state into the old one's storages
        (which are the module's own tensors; sharded: the module's ``DTensor`` shards): one copy of
        params and optimizer state is alive, and ``trainer.model`` is current after every step."""
        return True

    # -- distributed (see functrain.distributed) -------------------------------------------------
    def _distributed_step_kwargs(self, accumulate: int = 1) -> dict:
        """The step's hooks for this run: none for one process, DDP all-reduces, or sharded gathers."""
        if not fd.is_distributed():
            return {}
        # Each rank draws its own dropout masks (the state's key is the same on every rank).
        stream = {"rng_stream": fd.rank()}
        if self.args.sharded:
            _, count_reduce = fd.data_parallel_hooks()
            return {"param_transform": self._sharded_transform(accumulate), "count_reduce": count_reduce, **stream}
        if not self.args.average_tokens_across_devices:  # HF's opt-out: per-rank mean, ranks averaged
            grad_reduce, _ = fd.per_rank_mean_hooks()
            return {"grad_reduce": grad_reduce, **stream}
        grad_reduce, count_reduce = fd.data_parallel_hooks()
        return {"grad_reduce": grad_reduce, "count_reduce": count_reduce, **stream}

    def _sharded_transform(self, accumulate: int = 1):
        """Sharded mode gathers each unit's params where it runs (FSDP semantics in use); units are
        ``fsdp_config['transformer_layer_cls_to_wrap']`` blocks or the model's ``_no_split_modules``."""
        from functrain.parallel.fsdp import mixed_precision_of, shard_in_use

        mixed = mixed_precision_of(self.args.fsdp_config)
        why = self._why_gather_before_forward(accumulate, mixed)
        if why is not None:
            logger.warning("fsdp with torch_compile and %s: in torch %s params are then gathered before the "
                           "forward (a full replica during the step) instead of unit by unit", why, torch.__version__)
            return functools.partial(fd.gather_params, mixed=mixed)
        plan = shard_in_use(self.model, (self.args.fsdp_config or {}).get("transformer_layer_cls_to_wrap"), mixed)
        if self.args.gradient_checkpointing:
            # The units already redo their forward in backward (to gather again); a transformers
            # checkpoint around them would nest a second recomputation, which reads the shards. So the
            # units recompute everything instead (checkpointing per unit: the blocks, by default) and the
            # model's own checkpointing is off.
            self.model.gradient_checkpointing_disable()
            plan.recompute_all = True
        return plan

    def _why_gather_before_forward(self, accumulate: int, mixed) -> str | None:
        """Why a compiled sharded run cannot gather unit by unit (torch 2.13), or None when it can."""
        from functrain.parallel.fsdp import draws_random_numbers

        if not self.args.torch_compile:
            return None
        if accumulate > 1:
            return f"{accumulate} microbatches (use gradient_accumulation_steps=1 for per-unit gathers)"
        if mixed is not None:
            return "fsdp_config's mixed_precision_policy (its gathers cannot be recomputed unit by unit in a compiled graph)"
        if self.args.gradient_checkpointing:
            return ("gradient_checkpointing (the checkpointed blocks are compiled one forward at a time; per-unit "
                    "gathers cannot be recomputed inside it)")
        if draws_random_numbers(self.model):
            return "dropout in the model (a compiled graph cannot replay its random numbers when a unit is recomputed)"
        return None

    def _mark_process(self, state: TrainerState) -> TrainerState:
        state.is_world_process_zero = fd.is_main_process()
        state.is_local_process_zero = self.dist.local_rank == 0
        return state

    def _read_state(self, source, template: TrainState) -> TrainState:
        """Load a checkpoint's TrainState (``source``: a path or a ``ck.VerifiedCheckpoint`` read
        once); sharded templates/checkpoints reshard to this run (reading their rows from the disk)."""
        from functrain.parallel import checkpoint as dck

        path = source.path if isinstance(source, ck.VerifiedCheckpoint) else source
        self._check_same_optimizer(source, template)
        if fd.is_distributed() or dck.is_sharded_checkpoint(path):
            return dck.load_train_state(source, template, self.model)
        return ck.load_train_state(source, template, self.model)

    def _check_same_optimizer(self, source, template: TrainState) -> None:
        """Optimizer state is stored by position: another optimizer's could load silently."""
        try:
            ck.check_optimizer_structure(source, template)
        except ck.OptimizerMismatchError as e:
            path = source.path if isinstance(source, ck.VerifiedCheckpoint) else source
            saved = _saved_arg(path, "optim")
            raise ck.CheckpointError(
                f"checkpoint {path!r} was trained with optim={saved!r}, this run uses optim={self.args.optim!r}"
                f"{' (with optimizers= given)' if self.optimizer is not None else ''}: the optimizer states differ "
                f"({e}). Resume with the checkpoint's optimizer, or start a new run from its weights "
                "(from_pretrained on the checkpoint folder)") from None

    def _step_for_rows(self, rows: int):
        """The step for a window of ``rows`` examples (a short last window gets fewer microbatches)."""
        acc = self.args.gradient_accumulation_steps
        if rows % acc != 0:
            per = self.args.per_device_train_batch_size
            acc = next(k for k in range(1, rows + 1) if rows % k == 0 and rows // k <= per)
        if acc not in self._train_steps:
            step = self._make_train_step(self._tx, acc)
            step.accumulate = acc  # read by the loop for HF's on_substep_end events
            self._train_steps[acc] = step
        return self._train_steps[acc]

    def _get_eval_step(self, with_outputs: bool):
        ignore_keys = self._eval_ignore_keys
        key = (with_outputs, None if ignore_keys is None else tuple(ignore_keys))
        if key not in self._eval_steps:
            from functrain.step.train import make_eval_step

            from functrain.trainer.arg_effects import full_eval_params

            a = self.args
            self._eval_steps[key] = make_eval_step(
                self.model, self._eval_loss_fn(with_outputs, ignore_keys),
                precision="fp32" if a.fp16_full_eval or a.bf16_full_eval else a.precision,
                compile=a.torch_compile, compile_kwargs=compile_kwargs(a), deterministic=a.full_determinism,
                return_outputs=with_outputs,
                param_transform=full_eval_params(a, self._sharded_transform() if a.sharded and fd.is_distributed()
                                                 else None))
        return self._eval_steps[key]

    def _fresh_train_state(self, tx) -> TrainState:
        loss_scale = None
        if self.args.fp16:
            from functrain.core.precision import dynamic_scale_init

            loss_scale = dynamic_scale_init(device=self.args.device if sharded_start.is_meta(self.model)
                                            else next(self.model.parameters()).device)
        if self._meta_start is not None and sharded_start.is_meta(self.model):  # shards built module by module
            return self._meta_start.sharded_state(tx, self.args.seed).replace(loss_scale=loss_scale)
        # auto_find_batch_size: the (donated) state is a copy, so a retry after an out-of-memory error
        # starts from the module's initial weights.
        state = TrainState.create(self.model, tx, seed=self.args.seed, loss_scale=loss_scale,
                                  copy=self.args.auto_find_batch_size)
        if self._sharded_run():
            state = fd.shard_state(state)  # copies: each rank keeps its shards (the module gets them at the start)
        return state

    def _state_for_eval(self) -> TrainState:
        if self.train_state is not None:  # schedule-free: evaluate the averaged x (HF: optimizer.eval())
            s = self.train_state
            return s.replace(params=optim.schedule_free_eval_params(s.opt_state, s.params))
        if self._meta_start is not None and sharded_start.is_meta(self.model):  # before training: the shards
            return self._meta_start.sharded_state(optim.identity(), self.args.seed)
        return TrainState.create(self.model, optim.identity(), seed=self.args.seed)

    def _share_state_with_model(self) -> None:
        """Point the module's parameters and buffers at the state's tensors (no copy).

        Whatever reads ``self.model`` between steps (callbacks receive it, user code holds it)
        then sees the state training has reached, never the stale tensors of an earlier one; and
        the module no longer keeps a third copy of the weights alive. Sharded runs: the module's
        parameters become the state's ``DTensor`` shards (FSDP2's ``fully_shard`` layout), so no
        rank keeps the whole model; its forward gathers unit by unit, and full weights come from
        ``functrain.parallel.fsdp.full_state_dict`` (to rank 0 only, as ``save_model`` writes them).
        """
        s = self.train_state
        if self._sharded_run():
            from functrain.parallel.fsdp import use_shards_in_module

            use_shards_in_module(self.model, s.params, s.buffers)
            return
        for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            src = s.params.get(name, s.buffers.get(name))
            if src is not None and src is not t and src.shape == t.shape and src.dtype == t.dtype:
                t.data = src

    def _sharded_run(self) -> bool:
        return self.args.sharded and fd.is_distributed()

    def _sync_model(self) -> None:
        """Make the user's module reflect the state (sharded: its parameters are the shards)."""
        if self.train_state is None:
            return
        if self._sharded_run():
            self._share_state_with_model()
            return
        s = self.train_state
        with torch.no_grad():
            for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
                src = s.params.get(name, s.buffers.get(name))
                if src is not None and src is not t and src.data_ptr() != t.data_ptr():
                    t.copy_(src)

    def _weights_for_writer(self) -> dict | None:
        """Sharded: the full weights, gathered one tensor at a time to rank 0 only (a collective);
        else ``None``: the module holds them."""
        if not self._sharded_run():
            return None
        from functrain.parallel.fsdp import full_state_dict

        return full_state_dict(self.model)

    # -- training ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs) -> TrainOutput:
        """Train for ``max_steps`` (or ``num_train_epochs``); resume from a checkpoint if asked.

        ``resume_from_checkpoint=True`` takes the newest complete, valid checkpoint in
        ``output_dir``; a path resumes from that folder (a corrupted one is an error).
        ``auto_find_batch_size=True`` retries with a smaller ``per_device_train_batch_size`` after
        an out-of-memory error (accelerate's ``find_executable_batch_size``: x0.9 each time).
        """
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        self._memory_tracker.start("train")
        # One run per output_dir (see functrain.io.run_dir); the main process holds the lock.
        lock = run_dir.OutputDirLock(self.args.output_dir).acquire() if fd.is_main_process() else None
        self.is_in_train = True
        try:
            if not self.args.auto_find_batch_size:
                return self._train(resume_from_checkpoint, ignore_keys_for_eval)
            from accelerate.utils import find_executable_batch_size

            return find_executable_batch_size(self._train_with_batch_size, self.args.per_device_train_batch_size)(
                resume_from_checkpoint, ignore_keys_for_eval)
        finally:
            self.is_in_train = False
            if lock is not None:
                lock.release()
            self._memory_tracker.stop("train")

    def _train_with_batch_size(self, batch_size: int, resume_from_checkpoint, ignore_keys_for_eval) -> TrainOutput:
        if batch_size != self.args.per_device_train_batch_size:
            logger.warning("auto_find_batch_size: retrying with per_device_train_batch_size=%d", batch_size)
            self.args = dataclasses.replace(self.args, per_device_train_batch_size=batch_size)
            self.train_state = None  # the failed attempt's state; the module's tensors are untouched
            if self._first_shards is not None:  # sharded: the module holds the failed attempt's shards
                from functrain.parallel.fsdp import use_shards_in_module

                use_shards_in_module(self.model, self._first_shards)
        return self._train(resume_from_checkpoint, ignore_keys_for_eval)

    def _train(self, resume_from_checkpoint, ignore_keys_for_eval) -> TrainOutput:
        a = self.args
        resume = self._resolve_resume(resume_from_checkpoint)
        resume_path = None if resume is None else resume.path
        claim = dict(require_finite=not a.resume_allow_non_finite)
        run_dir.claim_output_dir(a.output_dir, resume_path, a.overwrite_output_dir, act=False, **claim)  # refuse early
        if self.model_init is not None:  # HF re-initializes on every train(), seeded (a resume loads over it)
            self._reinitialize_model()
        loader = compat.as_train_loader(self.get_train_dataloader())
        loader_is_stream = not hasattr(loader, "__len__") or getattr(loader, "is_iterable", False)
        if loader_is_stream:
            if a.max_steps <= 0:
                raise ValueError(f"the train_dataset ({type(self.train_dataset).__name__}) has no length (a "
                                 "streaming/iterable dataset), so num_train_epochs cannot be turned into a number "
                                 "of steps: set max_steps to a positive number")
            steps_per_epoch = a.max_steps
        else:
            steps_per_epoch = max(len(loader), 1)
        self._check_first_batch(getattr(loader, "dataset", None))
        max_steps = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        if steps_per_epoch == a.max_steps and loader_is_stream:
            # A stream's passes run until max_steps (HF: num_train_epochs = sys.maxsize); each
            # pass that yields anything is at least one step, so max_steps passes bound it.
            num_epochs = max_steps
        self._tx = self.create_optimizer_and_scheduler(max_steps)
        self._train_steps = {}
        state = self._fresh_train_state(self._tx)  # on resume, the template the checkpoint is read into
        # A sharded retry (auto_find_batch_size) starts from a copy of these (the step writes into them).
        self._first_shards = ({k: v.clone() for k, v in state.params.items()}
                              if a.auto_find_batch_size and self._sharded_run() else None)

        self.state = self._mark_process(TrainerState(max_steps=max_steps, num_train_epochs=num_epochs, epoch=0.0,
                                                     train_batch_size=a.per_device_train_batch_size))
        self.state.compute_steps(a, max_steps)
        self._flos = 0.0
        self._train_log = TrainerLog(self)
        hooks = [CallbackHook(self, steps_per_epoch), self._train_log, TrainerEvaluate(self, ignore_keys_for_eval),
                 TrainerCheckpoint(self, resume, loader, claim), ControlFlow(self, num_epochs)]
        neftune = self._activate_neftune()
        try:
            out = run(self._train_window, state, TrainWindows(loader, self._global_window()), steps=max_steps,
                      hooks=hooks)
        finally:
            if neftune is not None:
                neftune.remove()
        # The signal this process received (a stop agreed for another rank's signal: None, as before).
        self.interrupted = getattr(signal.Signals, out.signal, None) if out.signal else None
        return self._finish_training(out)

    def _train_window(self, state: TrainState, window):
        """The runner's step: the train step for this window's rows (a short last window of an
        epoch gets fewer microbatches)."""
        return self._step_for_rows(num_rows(window))(state, window)

    def _reinitialize_model(self) -> None:
        set_seed(self.args.seed)
        model, self._meta_start = sharded_start.build(self.model_init, self.args.sharded)
        self.model = self._place(model)
        self.callback_handler.model = self.model
        self.train_state = None
        self._eval_steps = {}  # they were built for the previous model

    def _resolve_resume(self, resume_from_checkpoint) -> ck.VerifiedCheckpoint | None:
        """The checkpoint to resume from, verified: each process reads its part of the files once
        here (all of them, or its own shard of a sharded checkpoint) and loads from those bytes."""
        from functrain.parallel import checkpoint as dck

        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        allow = self.args.resume_allow_non_finite
        if resume_from_checkpoint is True:
            found = dck.read_resumable_checkpoint(self.args.output_dir, require_finite=not allow)
            if found is None:
                raise ValueError(f"resume_from_checkpoint=True but no valid checkpoint was found in "
                                 f"{self.args.output_dir!r}")
            return found
        path = os.fspath(resume_from_checkpoint)
        # an explicit path that is corrupted is a clear error
        found = dck.read_checkpoint(path)
        bad = [] if allow else dck.non_finite_tensors(found)
        if bad:
            raise ck.CheckpointError(f"checkpoint {path!r} holds non-finite values (NaN/Inf) in {bad}; training on from "
                                     "it would only produce NaN. Resume from an earlier checkpoint, or set "
                                     "resume_allow_non_finite=True to load it anyway")
        logger.info("resuming from %s", path)
        return found

    def _resume_position(self, position: dict, loader) -> dict:
        """Where the data resumes: the saved position, in this run's batches (see docs/reliability.md)."""
        saved_seed = position.get("seed")
        if saved_seed is not None and saved_seed != loader.state.seed:
            logger.warning("resuming with data seed %d, the checkpoint's data order was drawn with %d: the run keeps "
                           "the checkpoint's order (%d), so the resume is exact. To draw another order, start a new "
                           "run", loader.state.seed, saved_seed, saved_seed)
            loader.use_seed(saved_seed)
        mapped = _map_data_position(position, self._global_window())
        if self.args.ignore_data_skip and mapped["batch_index"]:
            logger.info("ignore_data_skip=True: epoch %d is read again from its first batch (the %d batches already "
                        "trained on are not skipped)", mapped["epoch"], mapped["batch_index"])
            mapped = {**mapped, "batch_index": 0, "samples": 0}
        _resume_stream(loader, position, mapped)
        return mapped

    def _load_checkpoint(self, source: ck.VerifiedCheckpoint, template: TrainState) -> TrainState:
        path = source.path
        state = _into_storages(template, self._read_state(source, template))
        self.state = self._mark_process(TrainerState.load_from_json(ck.safe_file(path, ck.TRAINER_STATE_FILE)))
        self.state.best_model_checkpoint = _checked_best(self.state.best_model_checkpoint, self.args.output_dir)
        compat.restore_callbacks(self.callback_handler, self.state.stateful_callbacks,
                                 rebuild=bool(getattr(self.args, "restore_callback_states_from_checkpoint", False)))
        ck.load_rng_state(source)
        source.drop()
        return state

    def _global_window(self) -> int:
        a = self.args
        return a.per_device_train_batch_size * a.gradient_accumulation_steps * fd.world_size()

    def _finish_training(self, out) -> TrainOutput:
        """After ``run()``: the best model, the summary metrics, ``on_train_end``."""
        a, log = self.args, self._train_log
        stop_for_signal = out.signal is not None
        if stop_for_signal:
            logger.warning("training interrupted by %s at step %d; checkpoint written, exiting cleanly",
                           out.signal, self.state.global_step)
        if a.load_best_model_at_end and self.state.best_model_checkpoint and not stop_for_signal:
            self._load_best_model()
        self._share_state_with_model()
        self._sync_model()  # sharded: the module's parameters are the shards
        runtime = time.perf_counter() - log.start_time
        self.store_flos()
        steps = self.state.global_step - log.start_step
        total_loss = fd.all_reduce_sum(log.total_loss)  # each rank holds its share of the global mean
        train_loss = float(total_loss / steps) if steps > 0 else float("nan")
        metrics = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(log.total_samples / runtime, 3) if runtime > 0 else 0.0,
            "train_steps_per_second": round(steps / runtime, 3) if runtime > 0 else 0.0,
            "total_flos": self.state.total_flos,
            "train_loss": train_loss,
            "epoch": self.state.epoch,
        }
        self._read_faults()
        if self.state.nonfinite_updates_skipped:
            metrics["nonfinite_updates_skipped"] = self.state.nonfinite_updates_skipped
        if a.include_num_input_tokens_seen not in (False, "no"):
            self._flush_token_count()
            metrics["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        if a.include_tokens_per_second:
            metrics["train_tokens_per_second"] = round(log.train_tokens / runtime, 4) if runtime > 0 else 0.0
        self._memory_tracker.stop_and_update_metrics("train", metrics)
        self.log(dict(metrics))
        ck.wait_durable()  # every checkpoint of the run fsynced (they are, in the background) before train() ends
        self.control = self.callback_handler.on_train_end(a, self.state, self.control)
        self._finish_current_push()
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _flush_token_count(self) -> None:
        """Fold the non-padding tokens counted since the last read into the TrainerState."""
        if self._train_log is not None:  # None before train()
            self._train_log.flush_token_count()

    def _load_best_model(self):
        from functrain.parallel import checkpoint as dck

        best = self.state.best_model_checkpoint
        try:
            found = dck.read_checkpoint(best)  # each rank its part, once
        except ck.CheckpointError as e:
            logger.warning("could not load the best model: %s", e)
            return
        logger.info("loading best model from %s (score: %s)", best, self.state.best_metric)
        loaded = self._read_state(found, self.train_state)
        current = self.train_state
        self.train_state = _into_storages(current, current.replace(params=loaded.params, buffers=loaded.buffers))
        self.callback_handler.train_state = self.train_state

    # -- logging / eval / save cadence ----------------------------------------------------------
    def _read_faults(self) -> dict:
        """Read the fault counters (on logging/save steps and at the end: no extra host sync)."""
        if self._train_log is None:
            return {}
        skipped, first, empty = self._train_log.faults.read()
        if empty:
            logger.warning("%d training step(s) up to step %d had no supervised items (every label -100): their loss "
                           "is logged as 0 and they carry no gradient signal; check the labels / the collator",
                           empty, self.state.global_step)
        if not skipped:
            return {}
        self.state.nonfinite_updates_skipped += skipped
        if self.args.non_finite_policy == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradients (NaN/Inf) at step {first}: training stopped (non_finite_policy='stop'); "
                f"that update was not applied. Look at the batch of step {first}, lower the learning rate, or set "
                "non_finite_policy='skip' to skip such updates")
        logger.warning("%d update(s) with a non-finite loss or gradients (NaN/Inf) were skipped up to step %d (first at "
                       "step %d): params and optimizer state were left as they were (non_finite_policy='skip')",
                       skipped, self.state.global_step, first)
        return {"nonfinite_updates_skipped": skipped}

    def _evaluate(self, ignore_keys=None, skip_scheduler: bool = False) -> dict:
        metrics = self.evaluate(ignore_keys=ignore_keys)
        plateau = self._plateau_settings()
        if plateau is not None and not skip_scheduler:  # HF steps ReduceLROnPlateau with the metric here
            key = self._metric_key()
            if key not in metrics:
                raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: {key!r} is not among the "
                               f"evaluation metrics {sorted(metrics)}; reduce_lr_on_plateau needs it")
            opt_state = optim.observe_plateau(self.train_state.opt_state, metrics[key], **plateau)
            self.train_state = self.callback_handler.train_state = self.train_state.replace(opt_state=opt_state)
        return metrics

    def _metric_key(self) -> str:
        key = self.args.metric_for_best_model
        return key if key.startswith("eval_") else f"eval_{key}"

    def _determine_best_metric(self, metrics: dict) -> bool:
        if self.args.metric_for_best_model is None:
            return False
        key = self._metric_key()
        if key not in metrics:
            raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: {key!r} is not among the "
                           f"evaluation metrics {sorted(metrics)}; set metric_for_best_model to one of them")
        value = float(metrics[key])
        best = self.state.best_metric
        better = best is None or (value > best if self.args.greater_is_better else value < best)
        if better:
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
        return better

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` (adds ``epoch`` and ``step``) in the log history and send them to the callbacks."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # -- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self) -> str:
        a = self.args
        self._sync_model()
        weights = self._weights_for_writer()  # sharded: gathered to the writer only
        step = self.state.global_step
        path = ck.checkpoint_path(a.output_dir, step)
        if self.state.best_global_step is not None:
            best_dir = ck.checkpoint_path(a.output_dir, self.state.best_global_step)
            if self.state.best_global_step == step or os.path.isdir(best_dir):
                self.state.best_model_checkpoint = best_dir
        self._flush_token_count()
        self._read_faults()
        self.store_flos()
        self.state.stateful_callbacks = {type(cb).__name__: cb.state() for cb in self.callback_handler.callbacks
                                         if isinstance(cb, ExportableState)}
        # Each rank's own stream position (streaming datasets), gathered for the one writer.
        self.state.data_position = data_stream.gathered(self.state.data_position, fd.all_gather_json)
        self.state.pending_log = self._train_log.pending_log()
        ls = self.train_state.loss_scale
        self.state.loss_scale = float(ls.scale) if ls is not None and hasattr(ls, "scale") else None
        if self.args.sharded and fd.is_distributed() and not a.save_only_model:
            from functrain.parallel import checkpoint as dck

            dck.save_sharded_checkpoint(a.output_dir, step, model=self.model, train_state=self.train_state,
                                        trainer_state=self.state, args=a, processing_class=self.processing_class,
                                        model_state_dict=weights)
        elif fd.is_main_process():  # every rank holds the same state: one writer
            ck.save_checkpoint(a.output_dir, step, model=self.model,
                               train_state=None if a.save_only_model else self.train_state,
                               trainer_state=self.state, args=a, processing_class=self.processing_class,
                               model_state_dict=weights)
        if fd.is_main_process():
            ck.rotate_checkpoints(a.output_dir, a.save_total_limit, self.state.best_model_checkpoint, just_written=path)
        fd.barrier()  # no rank runs ahead (or resumes) before the checkpoint is complete
        if a.push_to_hub:
            self._push_from_checkpoint(path)
        return path

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, *,
                   merge_adapter: bool = False) -> None:
        """Save the weights (safetensors), config and processing class, loadable by ``from_pretrained``.

        A ``peft.PeftModel`` is saved as its adapter only (as transformers does), loadable by
        ``PeftModel.from_pretrained(base, output_dir)``; ``merge_adapter=True`` (functrain only)
        writes the base model with the adapter merged in (``merge_and_unload``) instead.
        """
        output_dir = output_dir or self.args.output_dir
        self._sync_model()
        weights = self._weights_for_writer()  # sharded: gathered to the writer only
        if fd.is_main_process() and merge_adapter:
            from functrain.adapters.peft import save_merged

            save_merged(self.model, output_dir, processing_class=self.processing_class)
        elif fd.is_main_process():
            ck.write_model(self.model, output_dir, processing_class=self.processing_class, state_dict=weights)
            self.args.save_to_json(os.path.join(output_dir, ck.ARGS_FILE))
        fd.barrier()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_state(self) -> None:
        """Write ``trainer_state.json`` to ``output_dir`` (main process only)."""
        if not fd.is_main_process():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(self.args.output_dir, ck.TRAINER_STATE_FILE))

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss (and ``compute_metrics`` / ``streaming_metrics``) on the eval set(s).

        Metric names start with ``metric_key_prefix``. A dict of datasets (given here or to the
        Trainer) is evaluated set by set with prefixes ``eval_{name}_``; a string picks one set of
        the Trainer's dict by name (as in transformers).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(eval_dataset, str):
            return self._evaluate_one(self._named_eval_set(eval_dataset), ignore_keys,
                                      f"{metric_key_prefix}_{eval_dataset}")
        if isinstance(dataset, dict):
            metrics = {}
            for name, ds in dataset.items():
                metrics.update(self._evaluate_one(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        return self._evaluate_one(dataset, ignore_keys, metric_key_prefix)

    def _named_eval_set(self, name: str):
        """The set called ``name`` in the Trainer's dict of eval datasets (as transformers reads a string)."""
        if not isinstance(self.eval_dataset, dict) or name not in self.eval_dataset:
            names = sorted(self.eval_dataset) if isinstance(self.eval_dataset, dict) else []
            raise KeyError(f"eval_dataset={name!r}: the Trainer's eval_dataset has no set of that name "
                           f"(named sets: {names})")
        return self.eval_dataset[name]

    def _evaluate_one(self, dataset, ignore_keys, metric_key_prefix: str) -> dict[str, float]:
        self._memory_tracker.start("eval")
        output = self._run_evaluation(dataset, ignore_keys, metric_key_prefix, collect=False)
        self._memory_tracker.stop_and_update_metrics("eval", output.metrics)
        self.log(dict(output.metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions (numpy), label ids and metrics on ``test_dataset``."""
        self._memory_tracker.start("test")
        output = self._run_evaluation(test_dataset, ignore_keys, metric_key_prefix, collect=True)
        self._memory_tracker.stop_and_update_metrics("test", output.metrics)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    def _run_evaluation(self, dataset, ignore_keys, prefix: str, collect: bool):
        from functrain.trainer.evaluation import evaluation_loop

        with_outputs = not self.args.prediction_loss_only and (
            collect or self.compute_metrics is not None or self.streaming_metrics is not None)
        # Each rank evaluates its share (HF's dealing of per-device batches); the loop gathers the
        # results in dataset order, so compute_metrics sees the single-process arrays. (A dataset
        # without a length, or batch_eval_metrics, is evaluated whole on every rank.)
        target = dataset if dataset is not None else self.eval_dataset
        shard = fd.is_distributed() and hasattr(target, "__len__") and not self.args.batch_eval_metrics
        # (shard only when asked: a subclass may override get_eval_dataloader(eval_dataset) as in HF)
        loader = self.get_eval_dataloader(dataset, shard=True) if shard else self.get_eval_dataloader(dataset)
        self._eval_ignore_keys = ignore_keys
        eval_step = self._get_eval_step(with_outputs)
        state = self._state_for_eval()
        across_ranks = self._eval_shard(loader) if shard else None
        batches = loader
        if across_ranks is not None:
            # With sharded params a batch of padding duplicates still runs (every rank must issue
            # the same gathers); its result is dropped.
            ghost = (lambda batch: eval_step(state, batch)) if self.args.sharded else None
            batches = across_ranks.batches(loader, ghost=ghost)
        self.callback_handler.eval_dataloader = loader
        output = evaluation_loop(eval_step, state, batches,
                                 compute_metrics=self.compute_metrics,
                                 preprocess_logits_for_metrics=self.preprocess_logits_for_metrics,
                                 streaming_metrics=self.streaming_metrics,
                                 prediction_loss_only=self.args.prediction_loss_only, metric_key_prefix=prefix,
                                 label_names=self.label_names, collect_predictions=collect or None,
                                 on_batch_end=self._on_prediction_step, across_ranks=across_ranks,
                                 **self._evaluation_options())
        return output

    def _eval_shard(self, loader):
        """This rank's share of the eval set (padding duplicates of the last round cut off)."""
        from functrain.parallel.gather import EvalShard

        per, world = self.args.per_device_eval_batch_size, fd.world_size()
        n = len(loader.dataset)
        if self.args.dataloader_drop_last:  # whole rounds only, as the sharded loader drops
            n -= n % (per * world)
        return EvalShard(n, per)

    def _on_prediction_step(self) -> None:
        self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)

    def _evaluation_options(self) -> dict:
        """HF's evaluation fields (``include_for_metrics``, ``batch_eval_metrics``,
        ``eval_do_concat_batches``) for :func:`functrain.trainer.evaluation.evaluation_loop`."""
        a = self.args
        include = list(getattr(a, "include_for_metrics", None) or [])
        unknown = sorted(set(include) - {"inputs", "loss"})
        if unknown:
            raise ValueError(f"include_for_metrics={include}: {unknown} not supported; use 'inputs' and/or 'loss'")
        return {"include_for_metrics": include,
                "batch_eval_metrics": bool(getattr(a, "batch_eval_metrics", False)),
                "eval_do_concat_batches": bool(getattr(a, "eval_do_concat_batches", True)),
                "main_input_name": getattr(self.model, "main_input_name", "input_ids")}

    # -- HF helper methods ------------------------------------------------------------------------
    is_deepspeed_enabled = False  # DeepSpeed is refused (registry.FIELDS["deepspeed"] says what to use)
    is_model_parallel = False  # one model per process, never split across devices

    @property
    def model_wrapped(self) -> nn.Module:
        """The module itself: functrain never wraps it (no DDP / FSDP wrapper; the step is a function)."""
        return self.model

    @property
    def is_fsdp_enabled(self) -> bool:
        """Whether this run shards params and optimizer state (``fsdp="full_shard"`` on several ranks)."""
        return self._sharded_run()

    @property
    def place_model_on_device(self) -> bool:
        return self.args.place_model_on_device

    @property
    def neftune_noise_alpha(self):
        return self.args.neftune_noise_alpha

    @property
    def current_flos(self) -> float:
        """FLOPs counted since the last ``store_flos()``."""
        return self._flos

    def is_world_process_zero(self) -> bool:
        """True on the process that writes files (rank 0 of all machines)."""
        return fd.is_main_process()

    def is_local_process_zero(self) -> bool:
        """True on the first process of this machine."""
        return self.dist.local_rank == 0

    def get_num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_learning_rates(self) -> list[float]:
        """The current learning rate (one entry: functrain's optimizer has one schedule for all params).
        Raises before training, as HF does without an optimizer."""
        from functrain.step.train import find_learning_rate

        lr = None if self.train_state is None else find_learning_rate(self.train_state.opt_state)
        if lr is None:
            raise ValueError("no learning rate yet: call train() first (the optimizer state holds the schedule's value)")
        return [float(lr)]

    def num_examples(self, dataloader) -> int:
        """Examples in ``dataloader``'s dataset (HF: else batches x per-device batch size)."""
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def floating_point_ops(self, inputs) -> int:
        """FLOPs of one forward + backward on ``inputs`` (HF's ``6 * tokens * parameters``); override it
        for other models. Summed into ``state.total_flos`` and the ``total_flos`` train metric."""
        return compat.floating_point_ops(self.model, inputs, self._non_embedding_parameters())

    def _non_embedding_parameters(self) -> int | None:
        """``model.num_parameters(exclude_embeddings=True)``, counted once per model (it walks every
        parameter; the count does not change in training)."""
        counted, count = self._counted_parameters
        if counted is None or counted() is not self.model:  # (a weak reference: a replaced model is freed)
            count = self.model.num_parameters(exclude_embeddings=True) if hasattr(self.model, "num_parameters") else None
            self._counted_parameters = (weakref.ref(self.model), count)
        return count

    def store_flos(self) -> None:
        """Add the FLOPs counted since the last call (all processes) to ``state.total_flos``."""
        self.state.total_flos += float(fd.all_reduce_sum(torch.tensor(self._flos, dtype=torch.float64)))
        self._flos = 0.0

    # -- hyperparameter search -------------------------------------------------------------------
    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20,
                              direction="minimize", backend: str = "optuna", hp_name=None, **kwargs):
        """Search hyperparameters with optuna, as ``transformers.Trainer.hyperparameter_search``.

        Needs ``model_init``. ``hp_space(trial) -> {TrainingArguments field: value}`` (default: HF's
        ``default_hp_space_optuna``); ``compute_objective(eval_metrics) -> float`` (default: eval_loss,
        or the sum of the other metrics). Each evaluation reports to optuna, which may prune the
        trial. Extra keyword arguments go to ``optuna.create_study`` (``sampler``, ``pruner``, ...)
        or ``study.optimize`` (``timeout``, ``callbacks``, ``catch``, ``gc_after_trial``).
        ``population=True``: train all trials at once as one vmapped population (search spaces of
        tensor hyperparameters only: learning_rate, weight_decay, adam_*, warmup_steps, seed); with
        ``pbt_interval=k`` also population-based training (pruning by replacement). Returns a
        ``BestRun(run_id, objective, hyperparameters)``. See :mod:`functrain.trainer.hp_search`.
        """
        from functrain.trainer.hp_search import hyperparameter_search

        return hyperparameter_search(self, hp_space, compute_objective, n_trials, direction, backend, hp_name,
                                     **kwargs)

    # -- NEFTune ------------------------------------------------------------------------
    def _activate_neftune(self):
        """Uniform noise on the input embeddings in training mode (NEFTune, arXiv 2310.05914).

        The noise is drawn inside the step, under the generator the step seeds from the state's rng
        key, so it is deterministic and resumes exactly.
        """
        alpha = self.args.neftune_noise_alpha
        if alpha is None:
            return None
        if not hasattr(self.model, "get_input_embeddings"):
            raise ValueError("neftune_noise_alpha needs a model with get_input_embeddings()")

        def hook(module, args, output):
            if module.training:
                magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
                output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
            return output

        return self.model.get_input_embeddings().register_forward_hook(hook)



# -- helpers --------------------------------------------------------------------------------------


def _into_storages(template: TrainState, loaded: TrainState) -> TrainState:
    """``loaded``'s values in ``template``'s tensors (the module's own, for params and buffers), so
    after a resume the module is still the storage of the state its donated step updates.
    Sharded states (DTensors) are returned as loaded."""
    from functrain.core import tree

    to, src = tree.leaves(template), tree.leaves(loaded)
    if any(type(t) is not torch.Tensor for t in to + src):
        return loaded
    with torch.no_grad():
        for t, s in zip(to, src):
            if t is not s:
                t.copy_(s)
    return template


def _map_data_position(position: dict, global_window: int) -> dict:
    """The loader position for this run from a saved one, by GLOBAL samples consumed in the epoch.

    A checkpoint written by N processes (or another batch size) resumes at the same sample when
    the global window (``per_device * accumulation * world_size``) divides it.
    """
    samples = position.get("samples")
    if samples is None:
        return position
    saved_window = samples // position["batch_index"] if position.get("batch_index") else None
    if saved_window is not None and saved_window != global_window:
        logger.warning("resuming with a global batch of %d (per_device_train_batch_size x gradient_accumulation_steps "
                       "x world size), the checkpoint was trained with %d: params, optimizer state, step, schedule "
                       "and rng continue exactly and the data continues at the same sample, but the batches, hence "
                       "the updates, are not those of the uninterrupted run", global_window, saved_window)
    if samples % global_window:
        resumed = samples // global_window * global_window
        logger.warning("the checkpoint stopped after %d samples of epoch %d, not a whole number of this run's global "
                       "batches of %d: the epoch resumes at sample %d, so %d samples are seen twice (none is "
                       "skipped). An exact resume needs a global batch that divides %d", samples, position["epoch"],
                       global_window, resumed, samples - resumed, samples)
    return {**position, "batch_index": samples // global_window}


def _resume_stream(loader, saved: dict, mapped: dict) -> None:
    """A streaming loader continues its stream from the saved state (O(1)) when the run resumes at
    the saved batch; the loop's ``iter_from`` at that position then uses it."""
    from functrain.data import ResumableLoader

    has_stream = data_stream.STREAM in saved or data_stream.STREAMS in saved
    if not (isinstance(loader, ResumableLoader) and loader.is_iterable and has_stream):
        return
    if mapped["batch_index"] != saved.get("batch_index"):
        return  # another global batch, or ignore_data_skip: the stream is read up to the new position
    keep = ("epoch", "batch_index", data_stream.STREAM, data_stream.STREAMS)
    loader.load_state_dict({**{k: saved[k] for k in keep if k in saved}, "seed": loader.state.seed})


def _saved_arg(path: str, name: str):
    """A field of the checkpoint's training_args.json (listed in its manifest), or None."""
    try:
        with open(ck.safe_file(path, ck.ARGS_FILE), encoding="utf-8") as f:
            return json.load(f).get(name)
    except (ck.CheckpointError, ValueError, AttributeError):
        return None


def _checked_best(best: str | None, output_dir: str) -> str | None:
    """``best_model_checkpoint`` from a checkpoint, only if it is a checkpoint-N folder of output_dir."""
    if best is None:
        return None
    inside = isinstance(best, str) and os.path.dirname(os.path.realpath(best)) == os.path.realpath(output_dir)
    if inside and ck.CHECKPOINT_RE.match(os.path.basename(os.path.normpath(best))):
        return best
    logger.warning("ignoring best_model_checkpoint=%r from the checkpoint: it is not a checkpoint-N folder of "
                   "output_dir %r", best, output_dir)
    return None


def _check_peft(model, args) -> None:
    from functrain.adapters.peft import check_trainer_arguments

    check_trainer_arguments(model, args)


def _torch_optim_name(obj) -> str:
    cls = type(obj)
    return f"torch.optim.{cls.__name__}" if isinstance(obj, torch.optim.Optimizer) else cls.__name__


def _check_optimizers(optimizers):
    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        raise TypeError("optimizers must be a pair (optimizer, scheduler), e.g. (functrain.optim.adamw(...), None)")
    tx, sched = optimizers
    if isinstance(tx, torch.optim.Optimizer):
        raise TypeError(f"optimizers[0] is a {_torch_optim_name(tx)}: functrain needs a pure optimizer. "
                        "Pass a functrain.optim GradientTransformation instead, e.g. "
                        "functrain.optim.adamw(functrain.schedules.get_schedule('linear', 5e-5, num_training_steps=N), "
                        "weight_decay=0.01)")
    if tx is not None and not isinstance(tx, optim.GradientTransformation):
        raise TypeError(f"optimizers[0] must be a functrain.optim.GradientTransformation, got {type(tx).__name__}")
    if sched is not None:
        raise TypeError("optimizers[1] (a scheduler) must be None: give the learning-rate schedule to the functrain "
                        "optimizer itself (learning_rate=functrain.schedules.get_schedule(...))")
    return tx, sched


def _default_collator(processing_class):
    from functrain.data import collators  # noqa: F401 (submodule)

    if processing_class is not None and hasattr(processing_class, "pad"):
        return collators.DataCollatorWithPadding(processing_class)
    return collators.default_data_collator


def _warn_keys_into_kwargs(model, batch: Mapping, custom_loss: bool) -> None:
    """A model whose forward takes ``**kwargs`` accepts any batch key, and may ignore it silently:
    name the keys that are not named arguments (the step checks models without ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    if custom_loss or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    extra = sorted(set(batch) - {p.name for p in params})
    if extra:
        logger.warning("batch key(s) %s are not named arguments of %s.forward; they go into its **kwargs, where the "
                       "model may ignore them. Drop them (remove_unused_columns=True or the collator) if unused",
                       extra, type(model).__name__)
