"""TrainingArguments: the Hugging Face names and defaults, validated when constructed.

Every field of transformers 5.x's TrainingArguments is accepted; what each does here (works,
refused, warned about and ignored, not implemented yet) is in :data:`functrain.trainer.registry.FIELDS`.
Everything here is plain data (saved as ``training_args.json``, never pickled). Checks that need
the datasets (e.g. ``eval_strategy`` without ``eval_dataset``) happen in ``Trainer.__init__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from functrain.trainer import registry
from functrain.trainer.args_setters import ArgumentSetters
from functrain.trainer.launch import apply_launch_env

INTERVAL_STRATEGIES = ("no", "steps", "epoch")
NON_FINITE_POLICIES = ("skip", "stop")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
              "critical": logging.CRITICAL, "passive": -1}
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")
TORCH_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

HUB_STRATEGIES = ("every_save", "end", "checkpoint", "all_checkpoints")

logger = logging.getLogger("functrain")
_warned_fields: set[str] = set()


class TrainingArgumentsError(ValueError):
    """A TrainingArguments value is invalid; the message names the field and what is expected."""


def _fail(msg: str):
    raise TrainingArgumentsError(msg)


class ParallelMode(enum.Enum):
    """transformers' ``ParallelMode`` values that apply here (functrain never uses ``nn.DataParallel``),
    so scripts testing ``args.parallel_mode.value == "distributed"`` work."""

    NOT_PARALLEL = "not_parallel"
    DISTRIBUTED = "distributed"


# transformers.HfArgumentParser reads these: ``--gradient_checkpointing`` alone means True, as for HF's fields.
_CLI_FLAG = {"nargs": "?", "const": True}


@dataclass
class TrainingArguments(ArgumentSetters):
    """The arguments of :class:`functrain.Trainer`, with the Hugging Face names and defaults.

    ``logging_steps``, ``eval_steps`` and ``save_steps`` may be a float in (0, 1): a fraction of
    the total number of training steps (as in transformers). ``warmup_steps`` below 1 is a ratio
    too (transformers 5); ``warmup_ratio`` is kept for older scripts.
    """

    output_dir: str | None = None
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    eval_strategy: str = "no"
    prediction_loss_only: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    eval_accumulation_steps: int | None = None
    eval_delay: float = 0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict | str | None = None
    warmup_ratio: float = 0.0
    warmup_steps: float = 0
    logging_dir: str | None = None
    logging_strategy: str = "steps"
    logging_first_step: bool = False
    logging_steps: float = 500
    logging_nan_inf_filter: bool = True
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    seed: int = 42
    data_seed: int | None = None
    bf16: bool = False
    fp16: bool = False
    eval_steps: float | None = None
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    run_name: str | None = None
    disable_tqdm: bool | None = None
    remove_unused_columns: bool = True
    label_names: list[str] | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    optim: str = "adamw_torch_fused"
    optim_args: str | None = None
    # Unions are ordered as transformers declares them: HfArgumentParser reads the second member as the
    # command-line type, so it must be a plain class (tests/test_hf_script_surface.py).
    report_to: None | str | list[str] = "none"
    gradient_checkpointing: bool | None = field(default=None, metadata=_CLI_FLAG)
    gradient_checkpointing_kwargs: dict | str | None = None
    include_num_input_tokens_seen: bool | str = "no"
    neftune_noise_alpha: float | None = None
    torch_compile: bool = False
    eval_on_start: bool = False
    # -- distributed (see docs/distributed.md) --
    fsdp: None | str | list[str] = field(default=None, metadata=_CLI_FLAG)  # (True and a list of options are accepted too)
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    average_tokens_across_devices: bool = True
    # -- the rest of transformers 5.x's fields (status of each: functrain.trainer.registry.FIELDS) --
    optim_target_modules: None | str | list[str] = None
    label_smoothing_factor: float = 0.0
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: bool | None = None
    activation_checkpointing: bool | None = field(default=None, metadata=_CLI_FLAG)
    activation_checkpointing_kwargs: dict | str | None = None
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    use_liger_kernel: bool = False
    liger_kernel_config: dict | None = None
    use_cache: bool = False
    torch_empty_cache_steps: int | None = None
    auto_find_batch_size: bool = False
    log_on_each_node: bool = True
    log_level: str = "passive"
    log_level_replica: str = "warning"
    project: str = "huggingface"
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | None = None
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    include_for_metrics: list[str] = field(default_factory=list)
    batch_eval_metrics: bool = False
    save_on_each_node: bool = False
    enable_jit_checkpoint: bool = False
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"
    hub_always_push: bool = False
    hub_revision: str | None = None
    ignore_data_skip: bool = False
    restore_callback_states_from_checkpoint: bool = False
    full_determinism: bool = False
    use_cpu: bool = False
    accelerator_config: dict | str | None = None
    parallelism_config: Any = None
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    dataloader_multiprocessing_context: str | None = None
    dataloader_in_order: bool = True
    train_sampling_strategy: str = "random"
    length_column_name: str = "length"
    ddp_find_unused_parameters: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_static_graph: bool | None = None
    fsdp_config: dict | str | None = None
    deepspeed: dict | str | None = None
    debug: str | list[str] = ""
    skip_memory_metrics: bool = True
    resume_from_checkpoint: str | None = None
    local_rank: int = -1
    # -- transformers 4.x names older scripts still pass --
    group_by_length: bool = False
    include_tokens_per_second: bool = False
    # -- functrain's own (docs/reliability.md) --
    # What a NaN/Inf loss or gradient does (fp32/bf16): "skip" the update and count it (warned on
    # logging steps), or "stop" training with an error naming the step.
    non_finite_policy: str = "skip"
    # Resume from a checkpoint holding NaN/Inf values (refused by default).
    resume_allow_non_finite: bool = False

    # -- validation -------------------------------------------------------------------------------
    def __post_init__(self):
        _check_field_statuses(self)
        apply_launch_env(self)
        if self.gradient_checkpointing is None:  # transformers 5's new name wins where the old one is unset
            self.gradient_checkpointing = self.activation_checkpointing
        if self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        self.output_dir = os.fspath(self.output_dir)
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")
        if self.run_name is None:
            self.run_name = self.output_dir
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = False
        self.lr_scheduler_kwargs = _json_dict(self.lr_scheduler_kwargs, "lr_scheduler_kwargs")
        self.gradient_checkpointing_kwargs = _json_dict(self.gradient_checkpointing_kwargs,
                                                        "gradient_checkpointing_kwargs") or None
        if isinstance(self.label_names, str):
            self.label_names = [self.label_names]
        self._check_choices()
        self._check_numbers()
        self._check_intervals()
        self._check_best_model()
        self._normalize_hf_fields()
        self.report_to = _resolve_report_to(self.report_to)

    def _check_choices(self):
        for name, allowed in (("eval_strategy", INTERVAL_STRATEGIES), ("logging_strategy", INTERVAL_STRATEGIES),
                              ("save_strategy", SAVE_STRATEGIES), ("hub_strategy", HUB_STRATEGIES)):
            value = getattr(self, name)
            value = getattr(value, "value", value)  # accept enums with .value
            if value not in allowed:
                _fail(f"{name}={value!r} is not valid; expected one of {list(allowed)}")
            setattr(self, name, value)
        self.optim = getattr(self.optim, "value", self.optim)
        if self.optim in registry.OPTIMIZERS_REFUSED:
            _fail(f"optim={self.optim!r}: {registry.OPTIMIZERS_REFUSED[self.optim]}")
        if self.optim not in registry.OPTIMIZERS:
            _fail(f"optim={self.optim!r} is not a known optimizer; known: {list(registry.OPTIMIZERS)}")
        sched = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        if sched in registry.SCHEDULES_NOT_YET:
            _fail(f"lr_scheduler_type={sched!r} is not implemented yet: {registry.SCHEDULES_NOT_YET[sched]}")
        if sched not in registry.SCHEDULES:
            _fail(f"lr_scheduler_type={sched!r} is not a known schedule; known: {list(registry.SCHEDULES)}")
        self.lr_scheduler_type = sched
        if self.non_finite_policy not in NON_FINITE_POLICIES:
            _fail(f"non_finite_policy={self.non_finite_policy!r} is not valid; expected one of "
                  f"{list(NON_FINITE_POLICIES)}")
        if self.fp16 and self.bf16:
            _fail("fp16=True and bf16=True were both given; choose one mixed-precision mode")
        self.fsdp = _normalize_fsdp(self.fsdp)
        self.fsdp_config = _normalize_fsdp_config(self.fsdp_config)
        _check_fsdp_mixed_precision(self.fsdp_config, self.bf16)
        if self.ddp_backend not in (None, "gloo", "nccl", "mpi", "xccl"):
            _fail(f"ddp_backend={self.ddp_backend!r} is not supported; expected None (nccl on GPUs, gloo on CPU), "
                  "'gloo', 'nccl', 'mpi' or 'xccl'")
        if isinstance(self.ddp_timeout, bool) or not isinstance(self.ddp_timeout, int) or self.ddp_timeout <= 0:
            _fail(f"ddp_timeout must be a positive number of seconds, got {self.ddp_timeout!r}")

    def _check_numbers(self):
        def at_least(name, low, *, allow_none=False, integer=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (numbers.Integral if integer else numbers.Real)):
                _fail(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r} ({type(v).__name__})")
            if not math.isfinite(v):
                _fail(f"{name} must be a finite number, got {v!r}")
            if v < low:
                _fail(f"{name} must be >= {low}, got {v!r}")

        at_least("learning_rate", 0)
        at_least("weight_decay", 0)
        at_least("adam_epsilon", 0)
        at_least("per_device_train_batch_size", 1, integer=True)
        at_least("per_device_eval_batch_size", 1, integer=True)
        at_least("gradient_accumulation_steps", 1, integer=True)
        at_least("num_train_epochs", 0)
        at_least("warmup_steps", 0)
        at_least("eval_delay", 0)
        at_least("dataloader_num_workers", 0, integer=True)
        at_least("max_grad_norm", 0, allow_none=True)
        at_least("save_total_limit", 0, allow_none=True, integer=True)
        at_least("seed", -(2**63), integer=True)
        at_least("data_seed", -(2**63), allow_none=True, integer=True)
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            _fail(f"max_steps must be an int (-1 means: use num_train_epochs), got {self.max_steps!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            _fail(f"max_steps must be a positive int or -1, got {self.max_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
                _fail(f"{name} must be in [0, 1), got {v}")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, numbers.Real) \
                or not 0 <= self.warmup_ratio <= 1:
            _fail(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            _fail(f"warmup_steps must be an integer number of steps or a ratio in [0, 1), got {self.warmup_steps}")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            _fail(f"neftune_noise_alpha must be > 0 (or None to disable), got {self.neftune_noise_alpha}")

    def _check_intervals(self):
        if self.eval_strategy == "steps" and self.eval_steps is None:
            if self.logging_steps <= 0:
                _fail("eval_strategy='steps' needs eval_steps (or a positive logging_steps to fall back on)")
            self.eval_steps = self.logging_steps
        for name, strategy in (("logging_steps", self.logging_strategy), ("eval_steps", self.eval_strategy),
                               ("save_steps", self.save_strategy)):
            v = getattr(self, name)
            if strategy != "steps":
                continue
            if v is None or v <= 0:
                _fail(f"{name} must be > 0 when the matching strategy is 'steps', got {v!r}")
            if v > 1 and not float(v).is_integer():
                _fail(f"{name} must be an integer number of steps or a ratio in (0, 1), got {v}")
            if v > 1:
                setattr(self, name, int(v))

    def _check_best_model(self):
        plateau = self.lr_scheduler_type == "reduce_lr_on_plateau"
        if plateau and self.eval_strategy == "no":
            _fail("lr_scheduler_type='reduce_lr_on_plateau' lowers the rate after evaluations, but "
                  "eval_strategy='no'; set eval_strategy")
        needs_metric = self.load_best_model_at_end or self.save_strategy == "best" or plateau
        if needs_metric and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.save_strategy == "best" and self.eval_strategy == "no":
            _fail("save_strategy='best' saves after evaluations, but eval_strategy='no'; set eval_strategy")
        if not self.load_best_model_at_end:
            return
        if self.eval_strategy == "no":
            _fail("load_best_model_at_end=True needs evaluations: set eval_strategy to 'steps' or 'epoch'")
        if self.save_strategy == "best":
            return
        if self.save_strategy != self.eval_strategy:
            _fail("load_best_model_at_end=True requires save_strategy to match eval_strategy (or be 'best'), "
                  f"got save_strategy={self.save_strategy!r}, eval_strategy={self.eval_strategy!r}")
        if self.eval_strategy == "steps":
            ratios = self.eval_steps < 1 or self.save_steps < 1
            if ratios:
                ok = self.eval_steps < 1 and self.save_steps < 1 and _is_multiple(self.save_steps, self.eval_steps)
            else:
                ok = int(self.save_steps) % int(self.eval_steps) == 0
            if not ok:
                _fail("load_best_model_at_end=True requires save_steps to be a multiple of eval_steps, "
                      f"got save_steps={self.save_steps}, eval_steps={self.eval_steps}")

    def _normalize_hf_fields(self):
        """The fields transformers 5.x added; same derived values as transformers' ``__post_init__``."""
        if self.eval_strategy != "no":
            self.do_eval = True
        for name in ("log_level", "log_level_replica"):
            if getattr(self, name) not in LOG_LEVELS:
                _fail(f"{name}={getattr(self, name)!r} is not a log level; expected one of {list(LOG_LEVELS)}")
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            _fail(f"train_sampling_strategy={self.train_sampling_strategy!r} is not supported; expected one of "
                  f"{list(SAMPLING_STRATEGIES)} ('batch_rebalance' is not implemented yet)")
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True  # as transformers: naming a backend or mode asks for compilation
        if self.torch_compile and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"
        if self.torch_compile_mode not in TORCH_COMPILE_MODES:
            _fail(f"torch_compile_mode={self.torch_compile_mode!r} is not a torch.compile mode; expected one of "
                  f"{list(TORCH_COMPILE_MODES)}")
        if self.fp16_full_eval and self.bf16_full_eval:
            _fail("fp16_full_eval=True and bf16_full_eval=True were both given; choose one evaluation dtype")
        if not 0 <= self.label_smoothing_factor < 1:
            _fail(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.eval_accumulation_steps is not None and (
                isinstance(self.eval_accumulation_steps, bool) or not isinstance(self.eval_accumulation_steps, int)
                or self.eval_accumulation_steps < 1):
            _fail(f"eval_accumulation_steps must be a positive int or None, got {self.eval_accumulation_steps!r}")
        if self.dataloader_prefetch_factor is not None and self.dataloader_num_workers == 0:
            _fail("dataloader_prefetch_factor can only be set when data is loaded in worker processes "
                  "(dataloader_num_workers > 0), as in torch's DataLoader")
        tokens = {True: "all", False: "no"}.get(self.include_num_input_tokens_seen, self.include_num_input_tokens_seen)
        if tokens not in ("all", "no", "non_padding"):
            _fail(f"include_num_input_tokens_seen must be 'all', 'non_padding', 'no' or a bool, got {tokens!r}")
        self.include_num_input_tokens_seen = tokens
        if self.use_cpu:
            self.dataloader_pin_memory = False  # as transformers
        _apply_tf32(self.tf32)

    # -- derived values ---------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def sharded(self) -> bool:
        """True when ``fsdp`` asks for sharded params and optimizer state (``"full_shard"``)."""
        return "full_shard" in self.fsdp.split()

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    # -- what transformers code reads off the arguments ---------------------------------------------
    @property
    def device(self) -> torch.device:
        """This process's device: CPU with ``use_cpu`` or without CUDA, else ``cuda:LOCAL_RANK``."""
        if self.use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_process_index)

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives: 0 or 1 (functrain never uses ``nn.DataParallel``)."""
        return 0 if self.device.type == "cpu" else 1

    @property
    def world_size(self) -> int:
        return _launch()[1]

    @property
    def process_index(self) -> int:
        return _launch()[0]

    @property
    def local_process_index(self) -> int:
        return _launch()[2]

    @property
    def should_log(self) -> bool:
        """Whether this process logs (every node's main process with ``log_on_each_node``)."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes checkpoints (``save_on_each_node``: every node's main process)."""
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

    default_optim = "adamw_torch_fused"  # transformers' class attribute (the optim field's default)

    @property
    def place_model_on_device(self) -> bool:
        """The Trainer moves the model to ``device`` itself (True, as transformers without model parallelism)."""
        return True

    @property
    def parallel_mode(self) -> ParallelMode:
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def ddp_timeout_delta(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.ddp_timeout)

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        """As transformers': the main process (of each node with ``local=True``) runs the block first
        while the others wait, then they run it (dataset preprocessing whose cache the others reuse).
        Joins the launcher's process group if the Trainer has not yet (it is joined the same way)."""
        if self.world_size <= 1:
            yield
            return
        from functrain.parallel import distributed as fd

        fd.init_distributed(self.ddp_backend, self.ddp_timeout_delta, cpu=self.use_cpu)
        is_main = (self.local_process_index if local else self.process_index) == 0
        try:
            if not is_main:
                logger.debug("process %d waits for the main%s process to do %s", self.process_index,
                             " local" if local else "", desc)
                fd.barrier()
            yield
        finally:
            if is_main:
                fd.barrier()

    def get_process_log_level(self) -> int:
        """``log_level`` on processes that log, else ``log_level_replica``; ``"passive"`` keeps the
        ``functrain`` logger's current level (transformers keeps its own library's)."""
        level = LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        return logger.getEffectiveLevel() if level == -1 else level

    def to_sanitized_dict(self) -> dict[str, Any]:
        """Flat values for TensorBoard's hparams (others as ``str``), as transformers."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str, torch.Tensor) else str(v) for k, v in d.items()}

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps: ``warmup_steps`` if >= 1, else a ratio (``warmup_steps`` or ``warmup_ratio``)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return math.ceil(num_training_steps * ratio)

    # -- serialization (JSON only) ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields, with tokens masked as HF does (``hub_token`` -> ``"<HUB_TOKEN>"``), so no
        secret reaches training_args.json, a tracker or the Hub."""
        return {f.name: f"<{f.name.upper()}>" if f.name.endswith("_token") and getattr(self, f.name) is not None
                else getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown and strict:
            _fail(f"unknown TrainingArguments field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str, *, strict: bool = True):
        """Read arguments written by :meth:`save_to_json` (e.g. a checkpoint's ``training_args.json``)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), strict=strict)


@dataclass
class Seq2SeqTrainingArguments(TrainingArguments):
    """TrainingArguments plus the generation knobs of transformers' Seq2SeqTrainingArguments."""

    sortish_sampler: bool = False
    predict_with_generate: bool = False
    generation_max_length: int | None = None
    generation_num_beams: int | None = None
    generation_config: Any = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        gc = d.get("generation_config")
        if gc is not None and not isinstance(gc, (str, dict)):
            d["generation_config"] = gc.to_dict() if hasattr(gc, "to_dict") else str(gc)
        return d


# HF's fsdp options functrain implements: full_shard (params, grads and optimizer state sharded).
# "auto_wrap" / "offload" are accepted names in HF; sharding here is per tensor, so auto_wrap is a no-op.
_FSDP_OPTIONS = ("full_shard", "auto_wrap")


def _normalize_fsdp_config(value):
    from functrain.parallel.fsdp import normalize_fsdp_config

    try:
        return normalize_fsdp_config(value)
    except (ValueError, OSError) as e:
        _fail(str(e))


def _check_fsdp_mixed_precision(config, bf16: bool) -> None:
    policy = (config or {}).get("mixed_precision_policy") or {}
    if policy.get("param_dtype") == "bfloat16" and not bf16:
        _fail("fsdp_config['mixed_precision_policy'] gathers params in bfloat16, which is bf16 compute: set "
              "bf16=True (params, gradients and optimizer state stay fp32 in the shards)")


def _normalize_fsdp(value) -> str:
    """HF's ``fsdp`` (True, "full_shard auto_wrap", a list, ""/False/None) -> a space-separated string."""
    if value is None or value is False:
        return ""
    if value is True:
        return "full_shard"
    words = value.split() if isinstance(value, str) else list(value)
    for w in words:
        if w not in _FSDP_OPTIONS:
            _fail(f"fsdp option {w!r} is not supported; functrain implements {list(_FSDP_OPTIONS)} "
                  "(params and optimizer state sharded as DTensor Shard(0); see docs/distributed.md)")
    if words and "full_shard" not in words:
        _fail(f"fsdp={value!r} needs 'full_shard' (the sharding strategy functrain implements)")
    return " ".join(words)


def _launch() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``: the process group's once joined, else the launcher's variables."""
    from functrain.parallel import distributed as fd

    if fd.is_distributed():
        info = fd.current_info()
        return info.rank, info.world_size, info.local_rank
    return fd.read_launch_env()


def _apply_tf32(tf32: bool | None) -> None:
    """Set TF32 matmuls as transformers does: True needs an Ampere-or-newer CUDA GPU; None leaves torch's setting."""
    available = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if tf32 and not available:
        _fail("tf32=True needs a CUDA GPU with TF32 (Ampere or newer), and none is available; leave tf32 unset "
              "(None) or set it to False")
    if tf32 is not None and available:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _is_multiple(a: float, b: float) -> bool:
    q = a / b
    return abs(q - round(q)) < 1e-9


def _json_dict(value, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            _fail(f"{name} must be a dict or a JSON object string, got {value!r} ({e})")
    if not isinstance(value, dict):
        _fail(f"{name} must be a dict, got {type(value).__name__}")
    return dict(value)


def _resolve_report_to(value) -> list[str]:
    """'none'/None -> []; 'all' -> the installed trackers; names checked (see trainer/integrations.py)."""
    from functrain.trainer.integrations import resolve_report_to

    try:
        return resolve_report_to(value)
    except ValueError as e:
        _fail(str(e))


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _check_field_statuses(args) -> None:
    """Refuse fields functrain cannot or does not yet honour; warn once about harmlessly ignored ones."""
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        value = getattr(value, "value", value)  # HF enums
        if value == _default_of(f) or (f.name == "debug" and not value):
            continue
        status = registry.field_status(f.name)
        if status.status == registry.REFUSED:
            _fail(f"{f.name}={value!r} is not supported by functrain: {status.why}")
        if status.status == registry.NOT_YET:
            note = f" ({status.why})" if status.why else ""
            _fail(f"{f.name}={value!r} is not implemented yet in functrain{note}; leave it at its default "
                  f"{_default_of(f)!r}")
        if status.status == registry.IGNORED and f.name not in _warned_fields:
            _warned_fields.add(f.name)
            logger.warning("TrainingArguments.%s=%r is ignored: %s", f.name, value, status.why)
