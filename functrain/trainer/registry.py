"""Every name an HF script can hand functrain, in one place: optimizers, schedules, integrations, fields.

Argument validation (:mod:`functrain.trainer.args`), the Trainer, PopulationTrainer,
hyperparameter search and the README read these tables; nothing else keeps a list of names.

``FIELDS`` gives every ``TrainingArguments`` field (transformers 5.x's, plus a few older names
scripts still pass) a status, one line each:

* ``ok()``: works through the Trainer (each has a Trainer-level test).
* ``refused(why)``: cannot apply to functrain; a non-default value is an error saying why and
  what to use instead.
* ``ignored(why)``: a non-default value is accepted with one warning; only where ignoring it
  cannot change results (the reason says why).
* ``not_yet(note)``: not implemented yet; a non-default value is an error, so nothing is silently
  ignored. Implementing the field is then a one-line change here: ``not_yet(...)`` -> ``ok()``.

Run ``python -m functrain.trainer.fields_readme`` to rewrite the README's field list from this table.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from functrain.core import optim
from functrain.core.optim import hf_names
from functrain.core.schedules import STEP_SCHEDULES

SUPPORTED, REFUSED, IGNORED, NOT_YET = "supported", "refused", "ignored", "not implemented yet"


@dataclass(frozen=True)
class FieldStatus:
    status: str
    why: str = ""


def ok(why: str = "") -> FieldStatus:
    return FieldStatus(SUPPORTED, why)


def refused(why: str) -> FieldStatus:
    return FieldStatus(REFUSED, why)


def ignored(why: str) -> FieldStatus:
    return FieldStatus(IGNORED, why)


def not_yet(note: str = "") -> FieldStatus:
    return FieldStatus(NOT_YET, note)


_LIGER = ("Liger kernels replace the model's modules at run time, which functrain does not do; use_liger_kernel=True "
          "selects functrain's own fused linear + cross-entropy, which takes no configuration")
_DDP_MODULE = ("functrain reduces gradients inside the pure step, not through torch's "
               "DistributedDataParallel module, so this DDP knob has nothing to act on and cannot change results")

FIELDS: dict[str, FieldStatus] = {
    # -- output and phases (HF's Trainer does not read do_*/resume_from_checkpoint either: scripts do)
    "output_dir": ok(),
    "do_train": ok("read by your script, as in transformers"),
    "do_eval": ok("read by your script; set to True when eval_strategy != 'no', as in transformers"),
    "do_predict": ok("read by your script, as in transformers"),
    "resume_from_checkpoint": ok("read by your script: trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)"),
    "overwrite_output_dir": ok("transformers 4.x name; stricter than transformers: a run next to another run's "
                               "checkpoints is refused unless True, which deletes them (docs/reliability.md)"),
    # -- batch and steps
    "per_device_train_batch_size": ok(),
    "per_device_eval_batch_size": ok(),
    "gradient_accumulation_steps": ok(),
    "auto_find_batch_size": ok(),
    "num_train_epochs": ok(),
    "max_steps": ok(),
    "average_tokens_across_devices": ok(),
    # -- optimizer and schedule
    "learning_rate": ok(),
    "lr_scheduler_type": ok(),
    "lr_scheduler_kwargs": ok(),
    "warmup_steps": ok(),
    "warmup_ratio": ok("transformers 4.x name, kept for older scripts"),
    "optim": ok(),
    "optim_args": ok(),
    "optim_target_modules": ok("the linear layers optim='galore_adamw'/'galore_adafactor' project (a list, a regex or 'all-linear')"),
    "weight_decay": ok(),
    "adam_beta1": ok(),
    "adam_beta2": ok(),
    "adam_epsilon": ok(),
    "max_grad_norm": ok(),
    "label_smoothing_factor": ok(),
    # -- precision and compilation
    "bf16": ok(),
    "fp16": ok(),
    "bf16_full_eval": ok("evaluation with the params cast to bf16 (also during train(), where transformers casts only "
                         "outside it)"),
    "fp16_full_eval": ok("as bf16_full_eval, in fp16"),
    "tf32": ok("True needs a CUDA GPU with TF32 (Ampere or newer); refused elsewhere, as in transformers"),
    "torch_compile": ok(),
    "torch_compile_backend": ok(),
    "torch_compile_mode": ok(),
    "use_liger_kernel": ok("trains with functrain's pure-torch chunked fused linear + cross-entropy "
                           "(functrain.step.fused_loss; no module replacement)"),
    "liger_kernel_config": refused(_LIGER),
    "gradient_checkpointing": ok(),
    "gradient_checkpointing_kwargs": ok(),
    "activation_checkpointing": ok("transformers 5 name of gradient_checkpointing"),
    "activation_checkpointing_kwargs": ok("transformers 5 name of gradient_checkpointing_kwargs"),
    "use_cache": ignored("functrain's train step always calls transformers models with use_cache=False (a KV "
                         "cache has no use in a training forward), so the value cannot change results"),
    "neftune_noise_alpha": ok(),
    "torch_empty_cache_steps": ignored("emptying the CUDA caching allocator only returns cached memory to the "
                                       "device; it cannot change results"),
    # -- logging
    "logging_dir": ok("transformers 4.x name, kept for older scripts"),
    "logging_strategy": ok(),
    "logging_steps": ok(),
    "logging_first_step": ok(),
    "log_on_each_node": ok(),
    "logging_nan_inf_filter": ok(),
    "include_num_input_tokens_seen": ok(),
    "include_tokens_per_second": ok("transformers 4.x name, kept for older scripts"),
    "log_level": ok(),
    "log_level_replica": ok(),
    "disable_tqdm": ok(),
    "report_to": ok(),
    "run_name": ok(),
    "project": ok(),
    "trackio_space_id": refused("functrain's trackio integration writes the local store only (TRACKIO_DIR); sync it to a Space with trackio's own tools"),
    "trackio_bucket_id": refused("functrain's trackio integration writes the local store only (TRACKIO_DIR); sync it to a Space with trackio's own tools"),
    "trackio_static_space_id": refused("functrain's trackio integration writes the local store only (TRACKIO_DIR); sync it to a Space with trackio's own tools"),
    "skip_memory_metrics": ok(),
    # -- evaluation
    "eval_strategy": ok(),
    "eval_steps": ok(),
    "eval_delay": ok(),
    "prediction_loss_only": ok(),
    "eval_on_start": ok(),
    "eval_do_concat_batches": ok("False: predictions/label_ids as lists of per-batch arrays"),
    "eval_use_gather_object": not_yet("issue #13 (evaluation outputs)"),
    "eval_accumulation_steps": ok("predictions move to the host every eval_accumulation_steps batches"),
    "include_for_metrics": ok("'inputs' and/or 'loss' go into the EvalPrediction"),
    "batch_eval_metrics": ok("compute_metrics(eval_pred, compute_result=is_last_batch) batch by batch"),
    # -- checkpoints
    "save_strategy": ok(),
    "save_steps": ok(),
    "save_total_limit": ok(),
    "save_only_model": ok(),
    "save_on_each_node": not_yet("multi-node without a shared file system"),
    "enable_jit_checkpoint": not_yet("issue #15 (functrain already checkpoints on SIGTERM/SIGINT)"),
    "load_best_model_at_end": ok(),
    "metric_for_best_model": ok(),
    "greater_is_better": ok(),
    "ignore_data_skip": ok(),
    "non_finite_policy": ok("functrain's own: 'skip' (default) or 'stop' on a NaN/Inf loss or gradient "
                            "(docs/reliability.md)"),
    "resume_allow_non_finite": ok("functrain's own: resume from a checkpoint holding NaN/Inf values"),
    "restore_callback_states_from_checkpoint": ok("True: stateful callbacks rebuilt from the checkpoint's "
                                                     "constructor args; their attributes are restored either way"),
    # -- Hub
    "push_to_hub": ok(),
    "hub_token": ok(),
    "hub_private_repo": ok(),
    "hub_model_id": ok(),
    "hub_strategy": ok(),
    "hub_always_push": ok(),
    "hub_revision": ok(),
    # -- reproducibility
    "seed": ok(),
    "data_seed": ok(),
    "full_determinism": ok(),
    # -- devices and data loading
    "use_cpu": ok(),
    "accelerator_config": refused("functrain does not wrap its loaders or step in an accelerate Accelerator (the "
                                  "step is one pure compiled function); split_batches, dispatch_batches, "
                                  "even_batches etc. have no equivalent; use_stateful_dataloader is what the "
                                  "Trainer's loaders do already (streams resume from their saved state, map-style "
                                  "datasets by slicing the epoch's order). Leave it unset"),
    "parallelism_config": refused("tensor/context/sequence parallelism are not implemented; use "
                                  "fsdp='full_shard' or data parallelism (docs/distributed.md)"),
    "dataloader_drop_last": ok(),
    "dataloader_num_workers": ok(),
    "dataloader_pin_memory": ok(),
    "dataloader_persistent_workers": ok(),
    "dataloader_prefetch_factor": ok(),
    "dataloader_multiprocessing_context": ok(),
    "dataloader_in_order": ok(),
    "remove_unused_columns": ok(),
    "label_names": ok(),
    "train_sampling_strategy": ok("'random', 'sequential' or 'group_by_length'; 'batch_rebalance' not yet"),
    "group_by_length": ok("transformers 4.x name of train_sampling_strategy='group_by_length'"),
    "length_column_name": ok(),
    # -- distributed
    "ddp_backend": ok(),
    "ddp_timeout": ok(),
    "ddp_find_unused_parameters": ignored(_DDP_MODULE),
    "ddp_bucket_cap_mb": ignored(_DDP_MODULE),
    "ddp_static_graph": ignored(_DDP_MODULE),
    "ddp_broadcast_buffers": not_yet("buffers (e.g. BatchNorm statistics) are kept per rank"),
    "fsdp": ok("'full_shard' (and 'auto_wrap'); see docs/distributed.md"),
    "fsdp_config": ok(),
    "deepspeed": refused("DeepSpeed runs its own engine around a torch.optim optimizer; functrain's step is one "
                         "pure function of its state. Use fsdp='full_shard' (ZeRO-3-like sharding of params, "
                         "gradients and optimizer state)"),
    "local_rank": ignored("the launcher's LOCAL_RANK environment variable is what functrain reads (as accelerate "
                          "does); the field only mirrors it"),
    "debug": refused("DebugOption 'underflow_overflow' / 'tpu_metrics_debug' are not implemented; use "
                     "torch.autograd.detect_anomaly() or a callback reading train_state"),
    # -- Seq2SeqTrainingArguments
    "sortish_sampler": ignored("transformers' Seq2SeqTrainer does not read it either (only its removed legacy "
                               "Seq2SeqDataset scripts did), so ignoring it gives transformers' results; use "
                               "train_sampling_strategy='group_by_length' for length-grouped batches"),
    "predict_with_generate": ok(),
    "generation_max_length": ok(),
    "generation_num_beams": ok(),
    "generation_config": ok(),
}


def field_status(name: str) -> FieldStatus:
    try:
        return FIELDS[name]
    except KeyError:
        raise KeyError(f"TrainingArguments field {name!r} has no entry in functrain.trainer.registry.FIELDS; "
                       "every field needs one") from None


# -- optimizers: HF ``optim`` name -> builder(args, model, schedule, extra_kwargs) ------------------
# The builders are the table in functrain.core.optim.hf_names (what transformers.Trainer builds for
# each name); this adapts TrainingArguments and the model to it.


def _decays(a) -> bool:
    """Whether to build the weight-decay branch. A tensor weight decay (a population member's, read
    from the optimizer state) always takes it: its value may differ per member, and decay 0 adds
    exactly 0 * param."""
    return isinstance(a.weight_decay, torch.Tensor) or a.weight_decay > 0


def _hf_hyperparams(a, model, extra: dict, decay_names=None) -> hf_names.HFHyperparams:
    """``decay_names``: the parameters to decay (a Trainer's ``get_decay_parameter_names``; default HF's rule)."""
    galore = a.optim.startswith("galore") and a.optim_target_modules is not None
    decays = _decays(a)
    names = frozenset(decay_names if decay_names is not None else optim.decay_parameter_names(model)) if decays else None
    return hf_names.HFHyperparams(
        a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.weight_decay,
        optim.default_weight_decay_mask(model, names) if decays else None, dict(extra),
        int(a.warmup_steps) if a.warmup_steps >= 1 else 0,  # HF hands warmup_steps to schedule-free optimizers
        frozenset(optim.galore_target_names(model, a.optim_target_modules)) if galore else frozenset(),
        names if decays else frozenset())


def _from_table(name: str):
    def build(a, model, schedule, extra, decay_names=None):
        return hf_names.build_hf_optimizer(name, schedule, _hf_hyperparams(a, model, extra, decay_names))

    build.hf_builder = hf_names.HF_OPTIMIZERS[name]
    return build


OPTIMIZERS: dict[str, Callable[..., Any]] = {name: _from_table(name) for name in hf_names.HF_OPTIMIZERS}
# HF names refused, with why and what to use instead.
OPTIMIZERS_REFUSED: dict[str, str] = dict(hf_names.REFUSED_HF_OPTIMIZERS)

# The optimizers whose update of each parameter reads only that parameter's gradient, state and
# value (so a donated eager step may update them a group at a time: functrain.step.grouped_update).
LEAFWISE_OPTIMIZERS: frozenset[str] = frozenset(
    {"adamw_torch", "adamw_torch_fused", "adamw", "adam", "sgd", "lion", "lion_32bit", "rmsprop", "adagrad"})

# PopulationTrainer builds these with per-member tensor hyperparameters (functrain.trainer.population;
# each tested equal to Trainer runs); a warmup length that differs between members needs "linear".
# Every registry optimizer vmaps (schedule-free's y/z states and GaLore's SVD projection refresh
# under torch.cond included: tests/test_population_optimizers.py); none is refused today.
POPULATION_REFUSED: dict[str, str] = {}
POPULATION_OPTIMIZERS: tuple[str, ...] = tuple(n for n in OPTIMIZERS if n not in POPULATION_REFUSED)


def parse_optim_args(text: str | None) -> dict:
    """HF's ``optim_args`` string ``"k1=v1,k2=v2"`` -> kwargs (numbers and booleans parsed)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"optim_args must look like 'key=value,key2=value2', got {text!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if v.lower() in ("true", "false"):
            out[k] = v.lower() == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def build_optimizer(args, model, schedule, extra: dict | None = None, decay_names=None):
    """The functrain optimizer for ``args.optim`` (weight decay skips biases and norms, as HF, unless
    ``decay_names`` lists the parameters to decay)."""
    return OPTIMIZERS[args.optim](args, model, schedule, dict(extra or {}), decay_names)


# -- Trainer(optimizer_cls_and_kwargs=(cls, kwargs)) -----------------------------------------------


def check_optimizer_cls_and_kwargs(value) -> tuple[type, dict] | None:
    """``(cls, kwargs)`` checked (a class functrain builds, kwargs it understands), or None."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], Mapping)):
        raise TypeError("optimizer_cls_and_kwargs must be a pair (optimizer class, kwargs dict), e.g. "
                        "(torch.optim.AdamW, {'lr': 1e-3})")
    cls, kwargs = value[0], dict(value[1])
    spec = hf_names.TORCH_OPTIMIZER_CLASSES.get(cls)
    if spec is None:
        known = ", ".join(f"torch.optim.{c.__name__}" for c in hf_names.TORCH_OPTIMIZER_CLASSES)
        raise TypeError(f"optimizer_cls_and_kwargs: {getattr(cls, '__qualname__', cls)!r} is not a class functrain "
                        f"builds as a pure optimizer ({known}); set TrainingArguments.optim to one of {list(OPTIMIZERS)}, "
                        "or pass optimizers=(a functrain.optim GradientTransformation, None)")
    if "params" in kwargs:
        raise ValueError("optimizer_cls_and_kwargs: 'params' (param groups) cannot be given; the Trainer builds HF's "
                         "decay / no-decay groups from weight_decay. For per-parameter settings pass "
                         "optimizers=(functrain.optim.partition(...), None)")
    for flag in hf_names.TORCH_UNSUPPORTED_FLAGS:
        if kwargs.get(flag):
            raise ValueError(f"optimizer_cls_and_kwargs: {cls.__name__}({flag}=True) is not implemented; use a "
                             "functrain.optim transformation through optimizers=(..., None)")
    allowed = {"lr", "weight_decay", *hf_names.TORCH_IMPLEMENTATION_KWARGS, *hf_names.TORCH_UNSUPPORTED_FLAGS,
               *(("betas", "eps") if spec.adam_kwargs else spec.extra_kwargs)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"optimizer_cls_and_kwargs: {cls.__name__} got {unknown}; it takes {sorted(allowed)}")
    return cls, kwargs


def torch_class_learning_rate(cls: type, kwargs: dict) -> float:
    """The rate HF's schedule scales: kwargs' ``lr``, else the class's default (as ``cls(...)`` gets)."""
    return kwargs["lr"] if "lr" in kwargs else inspect.signature(cls).parameters["lr"].default


def build_torch_class_optimizer(args, model, schedule, cls: type, kwargs: dict, decay_names=None):
    """What transformers' Trainer builds for ``optimizer_cls_and_kwargs=(cls, kwargs)``: ``cls`` over its
    decay / no-decay groups. As there, the groups' ``weight_decay`` (``args.weight_decay``) overrides
    one in kwargs, and ``args``' Adam betas / epsilon are not used."""
    spec = hf_names.TORCH_OPTIMIZER_CLASSES[cls]
    if "weight_decay" in kwargs and kwargs["weight_decay"] != args.weight_decay:
        logging.getLogger("functrain").warning(
            "optimizer_cls_and_kwargs' weight_decay=%s is overridden by TrainingArguments.weight_decay=%s on the decay "
            "group (0 on biases and norms), as in transformers' Trainer", kwargs["weight_decay"], args.weight_decay)
    defaults = inspect.signature(cls).parameters
    extra = {k: kwargs[k] for k in spec.extra_kwargs if k in kwargs}
    hp = _hf_hyperparams(args, model, extra, decay_names)
    if spec.adam_kwargs:
        b1, b2 = kwargs.get("betas", defaults["betas"].default)
        hp = hp._replace(adam_beta1=b1, adam_beta2=b2, adam_epsilon=kwargs.get("eps", defaults["eps"].default))
    return spec.build(schedule, hp)


# -- learning-rate schedules ---------------------------------------------------------------------

# Every step-function schedule of functrain.schedules.get_schedule, by HF name, and
# reduce_lr_on_plateau (the Trainer chains optim.reduce_on_plateau and feeds it eval metrics).
SCHEDULES: tuple[str, ...] = tuple(STEP_SCHEDULES) + ("reduce_lr_on_plateau",)
# HF names that are not a function of the step, with why they are not available.
SCHEDULES_NOT_YET: dict[str, str] = {
    "greedy": "it depends on the training loss (not implemented)",
}

# -- report_to integrations: the table lives with the tracker callbacks ------------------------------

from functrain.trainer.integrations import INTEGRATIONS  # noqa: E402  (name -> package + callback)


# -- the README's list -----------------------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
_BEGIN, _END = "<!-- fields:begin (python -m functrain.trainer.fields_readme) -->", "<!-- fields:end -->"


def readme_fields_markdown() -> str:
    """The README section listing every field by status, generated from :data:`FIELDS`."""
    def names(status):
        return [n for n, s in FIELDS.items() if s.status == status]

    def bullets(status):
        return "\n".join(f"- `{n}`: {FIELDS[n].why}" if FIELDS[n].why else f"- `{n}`" for n in names(status))

    supported = ", ".join(
        f"`{n}`" + (" (" + ", ".join(f"`{o}`" for o in OPTIMIZERS) + ")" if n == "optim" else "")
        + (" (" + ", ".join(f"`{s}`" for s in SCHEDULES) + ")" if n == "lr_scheduler_type" else "")
        + (" (" + ", ".join(f"`{i}`" for i in INTEGRATIONS) + ", `all`, `none`)" if n == "report_to" else "")
        for n in names(SUPPORTED))
    return "\n".join([
        _BEGIN,
        f"Supported `TrainingArguments` fields: {supported}.",
        "",
        "Refused when set (why, and what to use instead):",
        bullets(REFUSED),
        "",
        "Accepted with a warning and ignored (ignoring them cannot change results):",
        bullets(IGNORED),
        "",
        "Not implemented yet (an error when set to a non-default value):",
        bullets(NOT_YET),
        _END,
    ])


def readme_with_fields(text: str) -> str:
    pattern = re.compile(re.escape(_BEGIN) + ".*?" + re.escape(_END), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {_BEGIN!r} ... {_END!r} section")
    return pattern.sub(lambda _: readme_fields_markdown(), text)



# -- transformers.Trainer methods a subclass may override that functrain's Trainer never calls ----------
# Overriding one would be silently ignored, so the Trainer refuses it (naming what to use instead).

_LOOP = ("functrain runs its own loop (functrain.runner); hook into it with a TrainerCallback (on_step_end, "
         "on_log, on_evaluate, on_save) or override training_step / compute_loss")
_CHECKPOINT = ("checkpoints are functrain's safetensors format, written and verified by functrain.io.checkpoint "
               "(docs/reliability.md); use a TrainerCallback's on_save, or override save_model for the final model")
_PLACEMENT = "placement and distribution are functrain's (TrainingArguments fields, accelerate launch; docs/distributed.md)"
_OPTIMIZER = ("the optimizer is a functrain.optim transformation: set TrainingArguments.optim, pass "
              "optimizer_cls_and_kwargs=(torch.optim.AdamW, {...}) or optimizers=(tx, None), or override create_optimizer")
_INPUTS = "batches reach the step as the data_collator makes them: use a data_collator, or override get_train_dataloader"
_COUNTING = "the step counts the supervised items itself (labels != -100, over the window and across ranks)"
_PRECISION = ("the step runs under its own precision policy (bf16 / fp16 arguments); a context manager cannot "
              "enter the pure step")

HF_METHODS_NOT_CALLED: dict[str, str] = {
    **dict.fromkeys(("_inner_training_loop", "_run_epoch", "_maybe_log_save_evaluate", "_finalize_training",
                     "set_initial_training_values", "_init_training_state", "_prepare_for_training",
                     "_track_num_input_tokens", "_update_auto_batch_size", "end"), _LOOP),
    **dict.fromkeys(("_save", "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_save_optimizer_and_scheduler",
                     "_load_rng_state", "_save_rng_state", "_load_scaler", "_save_scaler", "_load_callback_state",
                     "_issue_warnings_after_load", "_get_output_dir", "_tune_save_checkpoint"), _CHECKPOINT),
    **dict.fromkeys(("_wrap_model", "_move_model_to_device", "create_accelerator_and_postprocess",
                     "_build_accelerator_args", "get_cp_size", "get_sp_size", "get_tp_size", "_has_mixed_mesh_grads",
                     "_mixed_mesh_grad_norm", "_sync_replicated_trainable_parameters", "_defer_fsdp_gradient_reduction",
                     "_prepare_context_parallel_inputs"), _PLACEMENT),
    **dict.fromkeys(("get_optimizer_cls_and_kwargs", "get_optimizer_group",
                     "_get_learning_rate", "_clip_grad_norm", "_get_grad_norm"), _OPTIMIZER),
    **dict.fromkeys(("_prepare_inputs", "_prepare_input", "_remove_unused_columns", "_set_signature_columns_if_needed",
                     "_get_collator_with_removed_columns", "_get_dataloader", "_get_train_sampler",
                     "_get_eval_sampler"), _INPUTS),
    **dict.fromkeys(("get_batch_samples", "_get_num_items_in_batch", "get_total_train_batch_size"), _COUNTING),
    **dict.fromkeys(("compute_loss_context_manager", "autocast_smart_context_manager"), _PRECISION),
    "evaluation_loop": "override prediction_step (called for every eval batch) or evaluate",
    "call_model_init": "pass model_init=...; the Trainer calls it at every train(), seeded, as HF does",
    **dict.fromkeys(("_hp_search_setup", "_report_to_hp_search"), "hyperparameter_search runs its trials itself"),
    "_validate_args": "TrainingArguments checks its fields itself (functrain.trainer.registry.FIELDS)",
}


def check_subclass_overrides(cls: type, base: type) -> None:
    """Raise when ``cls`` (a subclass of the Trainer ``base``) defines a transformers.Trainer method
    that ``base`` never calls."""
    for klass in cls.__mro__:
        if klass is base:
            return
        for name in HF_METHODS_NOT_CALLED.keys() & vars(klass).keys():
            if not hasattr(base, name):
                raise TypeError(f"{klass.__name__}.{name} overrides transformers.Trainer.{name}, which functrain's "
                                f"Trainer never calls, so the override would be silently ignored: "
                                f"{HF_METHODS_NOT_CALLED[name]}")
