"""FSDP semantics in use: each unit all-gathers its parameters where it runs and frees them after.

The state holds params as ``DTensor`` ``Shard(0)`` (:func:`functrain.parallel.distributed.shard_state`).
:func:`shard_in_use` splits a model into *units* (the blocks named by ``fsdp_config``'s
``transformer_layer_cls_to_wrap``, else the model's ``_no_split_modules`` as HF's auto wrap policy
does; every other module with parameters of its own is a unit too) and wraps each unit's
forward. When the step binds shards, a unit's forward runs as

    checkpoint(gather_and_run, has_items, *shards, *buffers, *inputs,
               context_fn=selective checkpoint: save matmul/conv/attention outputs only)

``gather_and_run`` all-gathers each shard (``redistribute(Replicate)``), masks the gradient of a
microbatch without supervised items, and runs the unit on the gathered tensors (a nested
``functional_call``). The backward of the gather reduce-scatters the gradient with SUM
(``grad_placements=[Partial("sum")]``). The selective-checkpoint policy keeps the outputs of the
compute ops and recomputes everything else, the all-gather included, so no gathered weight lives
between a unit's forward and its backward: the backward re-gathers. This is torchtitan's
SimpleFSDP (``experiments/simple_fsdp``: a parametrization that gathers on access plus a
recompute policy), adapted to a module whose tensors are bound by ``functional_call``.

Peak memory per rank: the shards (1/N of params, grads and optimizer state), activations, and the
gathered weights of the unit being run. Parameters that sit directly on a module that also holds
units (rare: e.g. a bare ``nn.Parameter`` on the model root) are gathered for the whole step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from functrain.parallel import distributed as fd

_WRAPPED = "_functrain_fsdp_unit"
_PLAN = "_functrain_fsdp_plan"


def _compute_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SAVE = _compute_ops()


def _recompute_policy(ctx, op, *args, **kwargs):
    # Outputs of compute ops are kept (as without recomputation); gathers, views of the gathered
    # weight and elementwise ops are redone in the backward, so the gathered weight is freed.
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_recompute_policy)


class ShardedUnits:
    """The ``param_transform`` of a step whose model gathers parameters unit by unit.

    Built by :func:`shard_in_use`. The step calls it once per microbatch as
    ``transform(params, has_items)``: it records ``has_items`` for the units (a microbatch without
    supervised items must send zeros, not its NaN, into the reduce-scatter), gathers the loose
    parameters (those of no unit, for the whole step) and leaves the units' shards to the units.
    """

    recomputes = True  # each unit's forward is redone in backward (make_train_step checks compile limits)

    def __init__(self, units: Sequence[str], loose: frozenset, blocks: tuple = (),
                 mixed: fd.MixedPrecision | None = None):
        self.units = tuple(units)
        self.loose = loose
        self.blocks = blocks
        self.mixed = mixed  # gather/reduce dtypes (FSDP2's MixedPrecisionPolicy), None: the shards' dtype
        self.has_items = None
        # True: a unit's whole forward is recomputed in backward (activation checkpointing per unit,
        # what gradient_checkpointing asks for); False: only its gathers and element-wise ops.
        self.recompute_all = False

    def __call__(self, params: Mapping, has_items=None) -> dict:
        self.has_items = has_items
        return {k: fd.gather_param(v, has_items, self.mixed) if k in self.loose else v for k, v in params.items()}


def shard_in_use(model: nn.Module, wrap: Sequence[str] | None = None,
                 mixed: fd.MixedPrecision | None = None) -> ShardedUnits:
    """Make ``model``'s units gather their sharded parameters where they run; returns the step's
    ``param_transform``.

    ``wrap``: class names of the blocks that form one unit each (HF's
    ``transformer_layer_cls_to_wrap``); default ``model._no_split_modules`` (HF's auto wrap
    policy), else none. Every other module with parameters of its own is a unit, except one that
    also holds units (its own parameters are gathered for the whole step). A unit whose params
    are not ``DTensor`` runs as before (one process, gathered evaluation). ``mixed``: gather in
    its ``param_dtype``, reduce-scatter in its ``reduce_dtype``. Applying it again returns the first
    plan (with ``mixed`` updated).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = _block_names(model, wrap)
    done = vars(model).get(_PLAN)
    if isinstance(done, ShardedUnits):
        if done.blocks != tuple(blocks):
            raise ValueError(f"{type(model).__name__} already has units {list(done.units)} (blocks {list(done.blocks)}); "
                             f"it cannot be re-planned with blocks {blocks}: build a fresh model")
        done.mixed = mixed
        return done
    units, loose = _plan_units(model, blocks)
    plan = ShardedUnits(units, frozenset(loose), tuple(blocks), mixed)
    for name in units:
        _wrap_unit(model.get_submodule(name), plan)
    vars(model)[_PLAN] = plan
    return plan


def _block_names(model: nn.Module, wrap) -> list:
    if isinstance(wrap, str):
        raise TypeError(f"wrap must be a list of class names, got the string {wrap!r}")
    classes = list(wrap) if wrap is not None else list(getattr(model, "_no_split_modules", None) or [])
    found = {type(m).__name__ for m in model.modules()}
    missing = [c for c in classes if c not in found]
    if wrap is not None and missing:
        raise ValueError(f"transformer_layer_cls_to_wrap names {missing}, which are not module classes of "
                         f"{type(model).__name__}; its classes are {sorted(found)}")
    blocks: list = []
    for name, m in model.named_modules():
        if type(m).__name__ in classes and not _inside(name, blocks):
            blocks.append(name)
    return blocks


def _inside(name: str, blocks) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


def _plan_units(model: nn.Module, blocks: list) -> tuple[list, list]:
    """Unit module names (blocks, then modules with params of their own) and loose param names."""
    units, loose = list(blocks), []
    for name, m in model.named_modules():
        own = [(name + "." if name else "") + n for n, _ in m.named_parameters(recurse=False)]
        if name in blocks or _inside(name, blocks) or not own:
            continue
        if any(any(True for _ in c.parameters()) for c in m.children()):
            loose += own  # its children gather themselves (recomputation regions do not nest)
        else:
            units.append(name)
    return units, loose


def _wrap_unit(module: nn.Module, plan: ShardedUnits) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        params = dict(module.named_parameters())
        if not any(fd.is_dtensor(p) for p in params.values()):
            return original(*args, **kwargs)
        return _run_gathered(module, params, plan, args, kwargs)

    vars(module)[_WRAPPED] = original
    module.forward = forward


def _run_gathered(module: nn.Module, params: dict, plan: ShardedUnits, args, kwargs):
    """The unit on gathered params; under autograd, recomputed (gathers included) in backward."""
    names, buffer_names = list(params), [n for n, _ in module.named_buffers()]
    buffers = [b for _, b in module.named_buffers()]
    n, b = len(names), len(buffers)

    def gather_and_run(has_items, *tensors, **kw):
        # Shards and buffers come in as arguments, so the recomputation uses the tensors the
        # forward used, whatever the module holds by then.
        bound = {k: fd.gather_param(p, has_items, plan.mixed) for k, p in zip(names, tensors[:n])}
        bound.update(zip(buffer_names, tensors[n:n + b]))
        return torch.func.functional_call(module, bound, tuple(tensors[n + b:]), kw, tie_weights=True)

    inputs = (plan.has_items, *params.values(), *buffers, *args)
    if not torch.is_grad_enabled():
        return gather_and_run(*inputs, **kwargs)
    contexts = noop_context_fn if plan.recompute_all else _selective_contexts
    return checkpoint(gather_and_run, *inputs, use_reentrant=False, context_fn=contexts, **kwargs)


def draws_random_numbers(model: nn.Module) -> bool:
    """Whether the forward likely draws random numbers: a dropout module with ``p > 0``, or a
    transformers config with a positive ``*dropout*`` / ``*pdrop*`` rate (attention dropout is often
    functional). Compiled per-unit recomputation cannot replay them in torch 2.13."""
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    if any(isinstance(m, dropouts) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = vars(config).items() if config is not None and hasattr(config, "__dict__") else ()
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in rates)


def is_unit(module: nn.Module) -> bool:
    """True if :func:`shard_in_use` made this module a unit."""
    return _WRAPPED in vars(module)


def sharded_in_use_hooks(model: nn.Module, wrap: Sequence[str] | None = None, group=None,
                         mixed: fd.MixedPrecision | None = None) -> dict:
    """Keyword arguments of ``make_train_step`` for sharded mode with per-unit gathers
    (:func:`shard_in_use`); the item count is all-reduced as in data parallel."""
    _, count_reduce = fd.data_parallel_hooks(group)
    return {"param_transform": shard_in_use(model, wrap, mixed), "count_reduce": count_reduce}


def use_shards_in_module(model: nn.Module, params: Mapping, buffers: Mapping | None = None) -> None:
    """Make ``model``'s parameters the given ``DTensor`` shards (no copy), as FSDP2's
    ``fully_shard`` leaves a module: each rank holds its shards, the module's full tensors are
    dropped, and its forward still works (each unit gathers where it runs, see :func:`shard_in_use`;
    so a forward is a collective: every rank calls it). Tied aliases get the same parameter;
    ``buffers`` (plain, replicated) replace the module's. Full weights: :func:`full_state_dict`.
    """
    aliases: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    current = dict(model.named_parameters())
    for name, shard in params.items():
        old = current.get(name)
        if old is None or not fd.is_dtensor(shard) or _is_same_shard(old, shard):
            continue
        new = nn.Parameter(shard, requires_grad=old.requires_grad)
        for alias in aliases[id(old)]:
            _set(model, alias, new, "_parameters")
    for name, b in (buffers or {}).items():
        if name not in current:  # frozen parameters sit in the state's buffers and stay whole
            _set(model, name, b, "_buffers")


def _is_same_shard(param, shard) -> bool:
    # nn.Parameter wraps a detached alias: the same shard shares its storage.
    return fd.is_dtensor(param) and param.to_local().data_ptr() == shard.to_local().data_ptr()


def _set(model: nn.Module, name: str, value, registry: str) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in getattr(module, registry):
        getattr(module, registry)[attr] = value


def full_state_dict(model: nn.Module) -> dict:
    """The module's full state dict on rank 0 (on the CPU), ``{}`` on the other ranks (a collective).

    Torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: the ``DTensor``
    parameters are all-gathered one at a time, and a rank other than 0 drops each at once, so only
    the writer ever holds the full weights (as accelerate's ``get_state_dict`` for FSDP2).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied aliases (lm_head.weight = wte.weight) come back as separate copies: make them one
    # tensor again, so writers drop the alias as they do for a whole module's state_dict().
    first: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in full:
            full[name] = full[first.setdefault(id(p), name)]
    return full


def sharded_state_from_meta(model: nn.Module, tx, *, seed: int = 0, mesh=None):
    """A sharded ``TrainState`` for a model built on the ``meta`` device, without ever holding it
    whole: module by module, its own parameters are materialized, initialized by its
    ``reset_parameters()`` (the same on every rank: seed the generator first), sharded, and freed.

    For models whose modules initialize themselves in ``reset_parameters`` (``torch.nn`` layers)
    and hold no buffers or tied parameters; others: build the model whole, then
    :func:`functrain.parallel.distributed.shard_state`.
    """
    from functrain.core.state import TrainState

    check_meta_model(model)
    mesh = mesh if mesh is not None else fd.make_mesh()
    params = {}
    for name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own:
            continue
        m.to_empty(device=mesh.device_type, recurse=False)
        m.reset_parameters()
        prefix = name + "." if name else ""
        params.update({prefix + n: fd.shard_tensor(p.detach(), mesh) for n, p in m.named_parameters(recurse=False)})
        m.to_empty(device="meta", recurse=False)  # the full tensors are freed: the module stays a skeleton
    state = TrainState(step=torch.zeros((), dtype=torch.int64), params=params, buffers={}, opt_state=tx.init(params),
                       rng=_key(seed), loss_scale=None, extras={})
    return state


def _key(seed: int):
    from functrain.core import rng

    return rng.key(seed)


def check_meta_model(model: nn.Module) -> None:
    """A ValueError naming why ``model`` cannot go through :func:`sharded_state_from_meta`."""
    problems = []
    if any(p.device.type != "meta" for p in model.parameters()):
        problems.append("its parameters are not on the meta device (build it under `with torch.device('meta'):`)")
    if any(True for _ in model.buffers()):
        problems.append("it has buffers (their values would be lost)")
    if len({id(p) for p in model.parameters()}) != len(list(model.named_parameters(remove_duplicate=False))):
        problems.append("it has tied parameters")
    missing = sorted({type(m).__name__ for m in model.modules()
                      if any(True for _ in m.parameters(recurse=False)) and not hasattr(m, "reset_parameters")})
    if missing:
        problems.append(f"{missing} have no reset_parameters()")
    if problems:
        raise ValueError(f"sharded_state_from_meta cannot build {type(model).__name__}: " + "; ".join(problems)
                         + ". Build the model whole and call functrain.distributed.shard_state instead")


# HF's fsdp_config keys ("fsdp_" prefix optional), by what functrain does with them.
_CONFIG_NO_EFFECT = frozenset({
    # Scheduling and checkpoint formats of torch's FSDP module: same numbers, nothing to act on.
    "backward_prefetch", "forward_prefetch", "limit_all_gathers", "use_orig_params", "sync_module_states",
    "cpu_ram_efficient_loading", "state_dict_type", "version", "auto_wrap_policy",
    # Size-based wrapping: functrain makes every module with params of its own a unit (smaller).
    "min_num_params"})
_CONFIG_REFUSED_IF_TRUE = {
    "offload_params": "CPU offload of parameters is not implemented",
    "cpu_offload": "CPU offload of parameters is not implemented",
    "activation_checkpointing": "set gradient_checkpointing=True in TrainingArguments instead",
    "xla": "XLA FSDP is not implemented (functrain runs torch.distributed DTensor sharding)",
    "xla_fsdp_grad_ckpt": "XLA FSDP is not implemented",
}


def normalize_fsdp_config(config) -> dict | None:
    """HF's ``fsdp_config`` (a dict or a JSON file path) checked and with ``fsdp_`` prefixes removed.

    Used: ``transformer_layer_cls_to_wrap`` (a class name or a list: the units of
    :func:`shard_in_use`). Keys of torch's FSDP module that cannot change functrain's numbers are
    accepted; offload, XLA, ``activation_checkpointing`` and ``reshard_after_forward=False`` are
    refused with what to use instead; unknown keys are an error.
    """
    if config is None:
        return None
    if isinstance(config, str):
        import json

        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f"fsdp_config must be a dict or the path of a JSON file, got {type(config).__name__}")
    out = {(k[len("fsdp_"):] if k.startswith("fsdp_") else k): v for k, v in config.items()}
    for key, value in out.items():
        if key in _CONFIG_REFUSED_IF_TRUE and value:
            raise ValueError(f"fsdp_config[{key!r}]={value!r}: {_CONFIG_REFUSED_IF_TRUE[key]}")
        if key == "reshard_after_forward" and value is False:
            raise ValueError("fsdp_config['reshard_after_forward']=False (SHARD_GRAD_OP) is not implemented: "
                             "functrain frees gathered params after each unit (FULL_SHARD); drop the key")
        known = key in _CONFIG_NO_EFFECT or key in _CONFIG_REFUSED_IF_TRUE or key in (
            "transformer_layer_cls_to_wrap", "reshard_after_forward", "xla_fsdp_settings", "mixed_precision_policy")
        if not known:
            raise ValueError(f"fsdp_config key {key!r} is not known; functrain uses 'transformer_layer_cls_to_wrap' "
                             f"and accepts {sorted(_CONFIG_NO_EFFECT)} (no effect on its sharding)")
    if out.get("mixed_precision_policy") is not None:
        out["mixed_precision_policy"] = _policy_names(out["mixed_precision_policy"])
    if out.get("xla_fsdp_settings"):
        raise ValueError("fsdp_config['xla_fsdp_settings']: XLA FSDP is not implemented")
    wrap = out.get("transformer_layer_cls_to_wrap")
    if isinstance(wrap, str):
        out["transformer_layer_cls_to_wrap"] = [wrap]
    elif wrap is not None and not (isinstance(wrap, (list, tuple)) and all(isinstance(c, str) for c in wrap)):
        raise ValueError(f"fsdp_config['transformer_layer_cls_to_wrap'] must be a class name or a list of them, "
                         f"got {wrap!r}")
    return out


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype_name(key: str, value) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"fsdp_config['mixed_precision_policy'][{key!r}]={value!r} is not a dtype; expected one "
                         f"of {sorted(_DTYPES)} (or the torch dtype)")
    return str(_DTYPES[name]).removeprefix("torch.")


def _policy_names(policy) -> dict:
    """``mixed_precision_policy`` (accelerate's dict, or torch's ``MixedPrecisionPolicy``) as dtype names."""
    if not isinstance(policy, Mapping):
        policy = {k: getattr(policy, k) for k in ("param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs")
                  if hasattr(policy, k)}
    unknown = sorted(set(policy) - {"param_dtype", "reduce_dtype", "output_dtype", "buffer_dtype",
                                    "cast_forward_inputs"})
    if unknown:
        raise ValueError(f"fsdp_config['mixed_precision_policy'] keys {unknown} are not known; expected "
                         "'param_dtype' and 'reduce_dtype'")
    out = {k: _dtype_name(k, policy.get(k)) for k in ("param_dtype", "reduce_dtype")}
    if out["param_dtype"] not in (None, "bfloat16", "float32"):
        raise ValueError(f"fsdp_config['mixed_precision_policy']['param_dtype']={out['param_dtype']!r}: functrain "
                         "gathers in bfloat16 or float32 (fp16 compute needs the loss scaling of fp16=True, which "
                         "works with fp32 gathers)")
    return out


def mixed_precision_of(config: Mapping | None) -> fd.MixedPrecision | None:
    """The :class:`~functrain.parallel.distributed.MixedPrecision` a normalized ``fsdp_config`` asks for."""
    names = (config or {}).get("mixed_precision_policy") or {}
    if names.get("param_dtype") is None:
        return None
    reduce = names.get("reduce_dtype")
    return fd.MixedPrecision(_DTYPES[names["param_dtype"]], _DTYPES[reduce] if reduce else None)
