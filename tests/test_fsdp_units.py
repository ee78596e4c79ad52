"""Units of per-unit sharding (functrain.parallel.fsdp), in one process.

The numerics on 2 ranks (== one process, gathers re-done in backward) are in
tests/test_distributed.py::test_step_parity_ddp_and_sharded.
"""

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.parallel import fsdp

from step_models import MLP, cls_batch, gpt2


def test_units_follow_no_split_modules_and_own_params():
    model = gpt2()
    plan = fsdp.shard_in_use(model)
    assert "transformer.h.0" in plan.units  # GPT2Block: HF's auto wrap policy
    assert {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"} <= set(plan.units)
    assert not any(u.startswith("transformer.h.0.") for u in plan.units)
    assert plan.loose == frozenset()
    assert fsdp.shard_in_use(model) is plan  # applied once
    with pytest.raises(ValueError, match="cannot be re-planned"):
        fsdp.shard_in_use(model, wrap=["GPT2Attention"])


def test_explicit_wrap_classes_and_loose_params():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            return self.body(x) * self.scale

    plan = fsdp.shard_in_use(Root(), wrap=["Sequential"])
    assert plan.units == ("body",)
    assert plan.loose == frozenset({"scale"})  # a module holding units: gathered for the whole step


def test_unknown_wrap_class_is_a_clear_error():
    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrap names \['GPT2Blok'\].*GPT2Block"):
        fsdp.shard_in_use(gpt2(), wrap=["GPT2Blok"])
    with pytest.raises(TypeError, match="list of class names"):
        fsdp.shard_in_use(gpt2(), wrap="GPT2Block")


def test_units_run_unchanged_on_plain_tensors():
    """Outside a sharded step (one process, gathered evaluation) a unit is the module itself."""
    torch.manual_seed(0)
    model = MLP()
    tx = ft.optim.adamw(1e-2)
    plain = ft.make_train_step(model, tx)
    state = ft.TrainState.create(model, tx, copy=True)
    ref, _ = plain(state, cls_batch())
    fsdp.shard_in_use(model)
    assert fsdp.is_unit(model.fc1) and fsdp.is_unit(model.fc2)
    out, _ = ft.make_train_step(model, tx)(state, cls_batch())
    assert ft.tree.relative_difference(out.params, ref.params) == 0.0


def test_sharded_state_from_meta_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="not on the meta device"):
        fsdp.sharded_state_from_meta(MLP(), ft.optim.adamw(1e-2))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="it has buffers"):
        fsdp.sharded_state_from_meta(model, ft.optim.adamw(1e-2))


def test_fsdp_config_names_the_units_and_refuses_what_it_cannot_do(tmp_path):
    a = ft.TrainingArguments("o", fsdp="full_shard", fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "GPT2Block",
                                                                  "backward_prefetch": "backward_pre"})
    assert a.fsdp_config["transformer_layer_cls_to_wrap"] == ["GPT2Block"]
    path = tmp_path / "fsdp.json"
    path.write_text('{"transformer_layer_cls_to_wrap": ["BertLayer"], "min_num_params": 0}')
    assert ft.TrainingArguments("o", fsdp=True, fsdp_config=str(path)).fsdp_config == {
        "transformer_layer_cls_to_wrap": ["BertLayer"], "min_num_params": 0}
    for config, match in [({"offload_params": True}, "offload"),
                          ({"activation_checkpointing": True}, "gradient_checkpointing=True"),
                          ({"reshard_after_forward": False}, "SHARD_GRAD_OP"),
                          ({"limit_all_gatherz": True}, "not known"),
                          ({"transformer_layer_cls_to_wrap": 3}, "class name or a list")]:
        with pytest.raises(ValueError, match=match):
            ft.TrainingArguments("o", fsdp=True, fsdp_config=config)


def test_compile_with_accumulation_and_per_unit_recompute_is_a_clear_error():
    model = MLP()
    with pytest.raises(ValueError, match="compile=True with accumulate > 1 cannot use ShardedUnits"):
        ft.make_train_step(model, ft.optim.adamw(1e-2), accumulate=2, compile=True,
                           param_transform=fsdp.shard_in_use(model))
