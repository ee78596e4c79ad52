"""What ``accelerate launch`` / ``accelerate config`` hand a script, read as TrainingArguments.

``accelerate launch --mixed_precision bf16 --dynamo_backend inductor --use_fsdp ...`` passes its
settings to the script as environment variables (``accelerate/commands/launch.py``,
``accelerate/utils/launch.py``); transformers' TrainingArguments and Accelerator read them. Here they
map onto the same fields, explicit arguments winning: ``ACCELERATE_MIXED_PRECISION`` -> ``bf16`` /
``fp16``, ``ACCELERATE_USE_CPU`` -> ``use_cpu``, ``ACCELERATE_DYNAMO_*`` -> ``torch_compile*``,
``ACCELERATE_USE_FSDP`` with ``FSDP_*`` -> ``fsdp``. A setting functrain cannot honour is an error
naming the variable, never a silent fp32 / unsharded / uncompiled run.
"""

from __future__ import annotations

import os

_TRUE, _FALSE = ("1", "true", "yes", "y", "on", "t"), ("0", "false", "no", "n", "off", "f", "")


class LaunchSettingError(ValueError):
    """An accelerate launch setting functrain cannot honour; the message names it and the way out."""


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LaunchSettingError(f"environment variable {name}={os.environ[name]!r} is not a boolean (true/false)")


def _refuse_if_set(name: str, why: str) -> None:
    if _flag(name):
        raise LaunchSettingError(f"{name}=true (from accelerate launch/config) is not supported: {why}")


def apply_launch_env(args) -> None:
    """Fill ``args`` fields the launcher configured and the user left at their defaults."""
    _refuse_if_set("ACCELERATE_USE_DEEPSPEED", "functrain's step is one pure function of its state, not a DeepSpeed "
                   "engine; use fsdp='full_shard' (or `accelerate launch --use_fsdp`)")
    _refuse_if_set("ACCELERATE_USE_MEGATRON_LM", "tensor/pipeline parallelism is not implemented; use fsdp='full_shard'")
    if _flag("ACCELERATE_USE_CPU"):
        args.use_cpu = True
    _mixed_precision(args)
    _dynamo(args)
    _fsdp(args)


def _mixed_precision(args) -> None:
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if args.fp16 or args.bf16 or value == "no":
        return  # explicit arguments win, as in transformers
    if value == "bf16":
        args.bf16 = True
    elif value == "fp16":
        args.fp16 = True
    else:
        raise LaunchSettingError(f"ACCELERATE_MIXED_PRECISION={value!r} (accelerate launch --mixed_precision) is not "
                                 "supported: functrain implements 'no', 'bf16' and 'fp16' (fp8 is not implemented)")


def _dynamo(args) -> None:
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if backend == "no" or args.torch_compile_backend is not None:
        return  # not asked for, or the script chose its own backend
    for name, why in (("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "functrain compiles the whole train step as "
                       "one graph"), ("ACCELERATE_DYNAMO_USE_DYNAMIC", "functrain compiles with static shapes; "
                       "pad batches to fixed lengths instead")):
        _refuse_if_set(name, why)
    args.torch_compile_backend = backend
    mode = os.environ.get("ACCELERATE_DYNAMO_MODE", "default").strip()
    if args.torch_compile_mode is None and mode != "default":
        args.torch_compile_mode = mode
    # ACCELERATE_DYNAMO_USE_FULLGRAPH needs nothing: the step always compiles with fullgraph=True.


# accelerate's FSDP_SHARDING_STRATEGY accepts the name or its 1-based number (FSDP1's ShardingStrategy).
_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP")


def _fsdp(args) -> None:
    if args.fsdp or not _flag("ACCELERATE_USE_FSDP"):
        return  # the script's own fsdp wins
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy.isdigit() and 1 <= int(strategy) <= len(_STRATEGIES):
        strategy = _STRATEGIES[int(strategy) - 1]
    if os.environ.get("FSDP_VERSION", "1").strip() == "2":
        strategy = "FULL_SHARD" if _flag_default("FSDP_RESHARD_AFTER_FORWARD", True) else "SHARD_GRAD_OP"
    if strategy == "NO_SHARD":
        return  # FSDP without sharding is data parallelism, functrain's default under a launcher
    if strategy != "FULL_SHARD":
        raise LaunchSettingError(f"FSDP sharding strategy {strategy} (accelerate config) is not supported: functrain "
                                 "implements FULL_SHARD (FSDP2 reshard_after_forward=True); choose it")
    _refuse_if_set("FSDP_OFFLOAD_PARAMS", "CPU offload of parameters is not implemented")
    _refuse_if_set("FSDP_ACTIVATION_CHECKPOINTING", "set gradient_checkpointing=True in TrainingArguments instead")
    words = ["full_shard"]
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper() in _WRAP_POLICIES:
        words.append("auto_wrap")
    args.fsdp = " ".join(words)
    classes = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    if classes and args.fsdp_config is None:  # the units of per-unit sharding (functrain.parallel.fsdp)
        args.fsdp_config = {"transformer_layer_cls_to_wrap": classes}
    # FSDP_STATE_DICT_TYPE, FSDP_SYNC_MODULE_STATES, FSDP_USE_ORIG_PARAMS, FSDP_*_PREFETCH and
    # FSDP_CPU_RAM_EFFICIENT_LOADING concern torch's FSDP module and its checkpoints; functrain's
    # sharded step and its own checkpoint format give the same numbers whatever they are.


def _flag_default(name: str, default: bool) -> bool:
    return _flag(name) if name in os.environ else default
