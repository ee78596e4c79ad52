"""The registry of names and TrainingArguments' transformers 5.x surface (fields, launch settings, helpers)."""

import dataclasses
import logging

import pytest
import transformers

from functrain import Seq2SeqTrainingArguments, TrainingArguments
from functrain.trainer import registry
from functrain.trainer.args import TrainingArgumentsError, _default_of
from functrain.trainer.launch import LaunchSettingError

HF_CLASSES = (transformers.TrainingArguments, transformers.Seq2SeqTrainingArguments)


def _hf_fields():
    return {f.name: f for cls in HF_CLASSES for f in dataclasses.fields(cls) if f.init}


def test_every_transformers_field_is_accepted_with_its_default():
    ours = {f.name: f for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    missing = sorted(set(_hf_fields()) - set(ours))
    assert missing == []
    differ = {n: (_default_of(f), _default_of(ours[n])) for n, f in _hf_fields().items()
              if _default_of(f) != _default_of(ours[n])}
    assert differ == {}


def test_every_field_has_exactly_one_registry_entry():
    ours = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    assert sorted(ours - set(registry.FIELDS)) == []
    assert sorted(set(registry.FIELDS) - ours) == []  # no stale entries
    assert {s.status for s in registry.FIELDS.values()} <= {registry.SUPPORTED, registry.REFUSED, registry.IGNORED,
                                                            registry.NOT_YET}
    for name, s in registry.FIELDS.items():
        if s.status in (registry.REFUSED, registry.IGNORED):
            assert len(s.why) > 20, f"{name}: a refused/ignored field needs its reason"


def test_readme_field_list_is_generated_from_the_registry():
    text = registry.README.read_text()
    assert registry.readme_with_fields(text) == text, "run: python -m functrain.trainer.fields_readme"


def test_registry_names_are_the_ones_that_work():
    from functrain.schedules import get_schedule

    settings = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
                "warmup_stable_decay": {"num_decay_steps": 3}}
    for name in registry.SCHEDULES:
        if name == "reduce_lr_on_plateau":  # not a step function: the optimizer's reduce_on_plateau (test_trainer_optim)
            continue
        get_schedule(name, 1e-3, num_training_steps=10, num_warmup_steps=2, **settings.get(name, {}))
    for name in registry.OPTIMIZERS:
        TrainingArguments("o", optim=name)
    assert "cosine_warmup_with_min_lr" in registry.SCHEDULES  # was implemented but refused by the old list
    with pytest.raises(TrainingArgumentsError, match="reduce_lr_on_plateau.*eval_strategy"):
        TrainingArguments("o", lr_scheduler_type="reduce_lr_on_plateau")


def _non_default(name):
    f = _hf_fields().get(name) or {f.name: f for f in dataclasses.fields(TrainingArguments)}[name]
    examples = {"deepspeed": "ds_config.json", "accelerator_config": {"split_batches": True},
                "parallelism_config": object(), "debug": "underflow_overflow", "liger_kernel_config": {"rope": True},
                "fsdp_config": {"min_num_params": 10}, "optim_target_modules": ["attn"], "hub_model_id": "me/model",
                "hub_token": "x", "hub_revision": "main", "hub_strategy": "end", "project": "p",
                "trackio_space_id": "s", "trackio_bucket_id": "b", "trackio_static_space_id": "s",
                "include_for_metrics": ["inputs"], "torch_empty_cache_steps": 3, "ddp_bucket_cap_mb": 25,
                "local_rank": 0}
    if name in examples:
        return examples[name]
    default = _default_of(f)
    return True if default in (None, False) else not default if isinstance(default, bool) else default


@pytest.mark.parametrize("name", [n for n, s in registry.FIELDS.items() if s.status == registry.REFUSED])
def test_refused_fields_fail_with_the_reason(name):
    with pytest.raises(TrainingArgumentsError, match=f"{name}=.*not supported by functrain"):
        TrainingArguments("o", **{name: _non_default(name)})


@pytest.mark.parametrize("name", [n for n, s in registry.FIELDS.items()
                                  if s.status == registry.NOT_YET and n in {f.name for f in
                                                                            dataclasses.fields(TrainingArguments)}])
def test_not_yet_fields_fail_when_set_and_pass_at_their_default(name):
    with pytest.raises(TrainingArgumentsError, match=f"{name}=.*not implemented yet"):
        TrainingArguments("o", **{name: _non_default(name)})
    TrainingArguments("o", **{name: _default_of({f.name: f for f in dataclasses.fields(TrainingArguments)}[name])})


@pytest.mark.parametrize("name", [n for n, s in registry.FIELDS.items() if s.status == registry.IGNORED])
def test_ignored_fields_warn_once(name, caplog, monkeypatch):
    from functrain.trainer import args as ta

    monkeypatch.setattr(ta, "_warned_fields", set())
    with caplog.at_level(logging.WARNING, logger="functrain"):
        Seq2SeqTrainingArguments("o", **{name: _non_default(name)})
        Seq2SeqTrainingArguments("o", **{name: _non_default(name)})
    warnings = [r for r in caplog.records if f"{name}=" in r.getMessage() and "ignored" in r.getMessage()]
    assert len(warnings) == 1


def test_hf_derived_values():
    a = TrainingArguments("o", torch_compile_mode="reduce-overhead", eval_strategy="steps", eval_steps=5)
    assert a.torch_compile and a.torch_compile_backend == "inductor" and a.do_eval
    assert TrainingArguments("o", use_cpu=True).dataloader_pin_memory is False
    assert TrainingArguments("o", group_by_length=True).train_sampling_strategy == "group_by_length"
    assert TrainingArguments("o", include_num_input_tokens_seen=True).include_num_input_tokens_seen == "all"
    assert TrainingArguments("o", activation_checkpointing=True).gradient_checkpointing is True
    for bad, match in (({"log_level": "loud"}, "log_level='loud'"),
                       ({"train_sampling_strategy": "batch_rebalance"}, "batch_rebalance"),
                       ({"label_smoothing_factor": 1.0}, "label_smoothing_factor"),
                       ({"fp16_full_eval": True, "bf16_full_eval": True}, "choose one"),
                       ({"dataloader_prefetch_factor": 2}, "dataloader_num_workers > 0"),
                       ({"eval_accumulation_steps": 0}, "eval_accumulation_steps")):
        with pytest.raises(TrainingArgumentsError, match=match):
            TrainingArguments("o", **bad)


def test_tf32_true_is_refused_without_an_ampere_gpu():
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        pytest.skip("this machine has TF32")
    with pytest.raises(TrainingArgumentsError, match="tf32=True needs a CUDA GPU"):
        TrainingArguments("o", tf32=True)
    TrainingArguments("o", tf32=False)  # as transformers: disabling what is absent is fine


def test_properties_hf_code_reads(monkeypatch):
    a = TrainingArguments("o", per_device_train_batch_size=3, per_device_eval_batch_size=5, use_cpu=True)
    assert (str(a.device), a.n_gpu, a.world_size, a.process_index, a.local_process_index) == ("cpu", 0, 1, 0, 0)
    assert a.should_log and a.should_save and (a.train_batch_size, a.eval_batch_size) == (3, 5)
    d = a.to_sanitized_dict()
    assert d["train_batch_size"] == 3 and isinstance(d["report_to"], str) and isinstance(d["label_names"], str)
    assert TrainingArguments.from_dict(dict(a.to_dict())).to_json_string() == a.to_json_string()
    # As a replica on node 0 (rank 1 of 2, local rank 1): replicas log at log_level_replica.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    a = TrainingArguments("o", log_level="info", log_level_replica="error")
    assert (a.world_size, a.process_index, a.local_process_index) == (2, 1, 1)
    assert not a.should_log and not a.should_save and a.get_process_log_level() == logging.ERROR
    monkeypatch.setenv("LOCAL_RANK", "0")  # main process of a second node
    assert a.should_log and not TrainingArguments("o", log_on_each_node=False).should_log


def test_set_helpers_validate_before_changing_anything():
    a = TrainingArguments("o")
    assert a.set_training(learning_rate=1e-3, batch_size=4, num_epochs=2) is a
    assert (a.learning_rate, a.per_device_train_batch_size, a.num_train_epochs, a.do_train) == (1e-3, 4, 2, True)
    a.set_evaluate(strategy="steps", steps=10, batch_size=16)
    assert (a.eval_strategy, a.eval_steps, a.per_device_eval_batch_size, a.do_eval) == ("steps", 10, 16, True)
    a.set_save(strategy="steps", steps=10, total_limit=2)
    a.set_logging(strategy="steps", steps=5, level="info")
    a.set_optimizer(name="adafactor", learning_rate=1e-2)
    a.set_lr_scheduler(name="cosine_warmup_with_min_lr", warmup_steps=0.1)
    a.set_dataloader(train_batch_size=2, num_workers=1, prefetch_factor=2)
    a.set_testing(batch_size=3)
    assert (a.optim, a.lr_scheduler_type, a.per_device_train_batch_size, a.per_device_eval_batch_size) == \
        ("adafactor", "cosine_warmup_with_min_lr", 2, 3)
    before = a.to_dict()
    with pytest.raises(TrainingArgumentsError, match="not a known optimizer"):
        a.set_optimizer(name="no_such_optimizer", learning_rate=0.5)
    assert a.to_dict() == before
    a.set_push_to_hub("me/model", strategy="checkpoint")
    assert (a.push_to_hub, a.hub_model_id, a.hub_strategy) == (True, "me/model", "checkpoint")


# -- accelerate launch settings ----------------------------------------------------------------------


@pytest.mark.parametrize("env, explicit, expected", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {}, {"bf16": True, "fp16": False}),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, {"fp16": True, "bf16": False}),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {"bf16": True}, {"bf16": True, "fp16": False}),  # explicit wins
    ({"ACCELERATE_USE_CPU": "true"}, {}, {"use_cpu": True, "dataloader_pin_memory": False}),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "max-autotune"}, {},
     {"torch_compile": True, "torch_compile_backend": "inductor", "torch_compile_mode": "max-autotune"}),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, {}, {"torch_compile": False, "torch_compile_backend": None}),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, {"torch_compile_backend": "eager"},
     {"torch_compile": True, "torch_compile_backend": "eager"}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1",
      "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}, {}, {"fsdp": "full_shard auto_wrap"}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, {},
     {"fsdp": "full_shard"}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, {}, {"fsdp": ""}),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, {"fsdp": "full_shard"},
     {"fsdp": "full_shard"}),  # the script's fsdp wins over the launcher's
])
def test_accelerate_launch_settings_map_onto_fields(monkeypatch, env, explicit, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    a = TrainingArguments("o", **explicit)
    assert {k: getattr(a, k) for k in expected} == expected


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "fp8 is not implemented"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "ACCELERATE_USE_DEEPSPEED"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "SHARD_GRAD_OP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_DYNAMIC": "true"}, "USE_DYNAMIC"),
    ({"ACCELERATE_USE_CPU": "maybe"}, "not a boolean"),
])
def test_accelerate_launch_settings_functrain_cannot_honour_are_refused(monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LaunchSettingError, match=match):
        TrainingArguments("o")
