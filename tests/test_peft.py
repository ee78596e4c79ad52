"""PEFT models (peft's LoRA, IA3, LoHa, prompt tuning) through the Trainer and the pure step.

The reference is transformers.Trainer on the same PeftModel (same seed, full-batch data), peft's
own ``PeftModel.from_pretrained`` for saved adapters, and hand-written torch loops.
"""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import functrain as ft
from functrain.adapters import peft as fpeft
from functrain.trainer import adapter_population
from functrain.core.state import TrainState
from functrain.step import population as P

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")
N, T, VOCAB = 8, 12, 64


def gpt2_base(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16,
                                                                n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def lora_model(seed=0):
    """Tiny GPT-2 with the issue's LoRA; lora_B made non-zero so the adapter matters from step 0."""
    model = peft.get_peft_model(gpt2_base(seed), peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                  fan_in_fan_out=True))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def dataset(n=N, seed=1):
    """Token rows; the first label is -100 (never predicted), so transformers 5.24's Trainer counts the same
    items as ours: it does not shift the count for GPT-2, whose loss_type is None."""
    ids = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": i, "attention_mask": torch.ones(T, dtype=torch.long), "labels": y} for i, y in zip(ids, labels)]


def batch_of(ds):
    return {k: torch.stack([e[k] for e in ds]) for k in ds[0]}


def adapter_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def ft_args(out, **kw):
    base = dict(per_device_train_batch_size=N, max_steps=6, learning_rate=5e-3, weight_decay=0.01, warmup_steps=2,
                logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    return ft.TrainingArguments(str(out), **{**base, **kw})


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


# -- the Trainer against transformers.Trainer ---------------------------------------------------


def test_lora_trainer_matches_transformers_trainer_and_saves_a_loadable_adapter(tmp_path):
    ds = dataset()
    ours = ft.Trainer(model=lora_model(), args=ft_args(tmp_path / "ft"), train_dataset=ds)
    ours.train()
    hf_model = lora_model()
    hf_args = transformers.TrainingArguments(
        str(tmp_path / "hf"), per_device_train_batch_size=N, max_steps=6, learning_rate=5e-3, weight_decay=0.01,
        warmup_steps=2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        use_cpu=True)
    hf = transformers.Trainer(model=hf_model, args=hf_args, train_dataset=ds)
    hf.train()

    ours_losses = [h["loss"] for h in ours.state.log_history if "loss" in h]
    hf_losses = [h["loss"] for h in hf.state.log_history if "loss" in h]
    assert len(ours_losses) == len(hf_losses) == 6
    assert ours_losses == pytest.approx(hf_losses, abs=2e-5)
    mine, theirs = adapter_params(ours.model), adapter_params(hf_model)
    assert list(mine) == list(theirs) and len(mine) == 4  # lora_A/B of 2 layers: the only trained tensors
    start = adapter_params(lora_model())
    for k in mine:
        assert not torch.allclose(mine[k], start[k])  # it trained
        torch.testing.assert_close(mine[k], theirs[k], atol=2e-5, rtol=0)

    # save_model writes what transformers writes for a PeftModel: the adapter files only.
    ours.save_model(str(tmp_path / "saved"))
    hf.save_model(str(tmp_path / "hf_saved"))
    adapter_files = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert adapter_files <= set(os.listdir(tmp_path / "saved"))
    assert not {"model.safetensors", "config.json"} & set(os.listdir(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "hf_saved" / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    batch = batch_of(ds)
    loaded = peft.PeftModel.from_pretrained(gpt2_base(), str(tmp_path / "saved"))
    assert torch.equal(logits(loaded, batch), logits(ours.model, batch))


def test_frozen_base_is_kept_once_and_never_in_optimizer_or_checkpoint_state(tmp_path):
    model = lora_model()
    base = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainer = ft.Trainer(model=model, args=ft_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                         train_dataset=dataset())
    trainer.train()
    state = trainer.train_state
    assert set(state.params) == set(adapter_params(model))
    for name, p in base.items():  # the state's frozen base IS the module's tensors: no copy was made
        assert state.buffers[name].data_ptr() == p.data_ptr()
    opt_names = {path.split(".", 2)[-1] for path in ft.tree.paths(state.opt_state) if "lora" in path}
    assert opt_names and all(n in state.params for n in opt_names)
    assert not any("c_attn.base_layer" in p or "wte" in p for p in ft.tree.paths(state.opt_state))
    with safe_open(str(tmp_path / "checkpoint-2" / "train_state.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("buffers.") for k in keys)
    state_bytes = os.path.getsize(tmp_path / "checkpoint-2" / "train_state.safetensors")
    base_bytes = sum(p.numel() * p.element_size() for p in base.values())
    assert state_bytes < base_bytes / 2  # adapters + their AdamW moments, a fraction of the base


def test_resume_from_an_adapter_checkpoint_is_bitwise(tmp_path):
    ds = dataset()
    full = ft.Trainer(model=lora_model(), args=ft_args(tmp_path / "a", save_strategy="steps", save_steps=3),
                      train_dataset=ds)
    full.train()
    resumed = ft.Trainer(model=lora_model(), args=ft_args(tmp_path / "a", save_strategy="steps", save_steps=3),
                         train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    a, b = adapter_params(full.model), adapter_params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = ft.tree.leaves(full.train_state.opt_state), ft.tree.leaves(resumed.train_state.opt_state)
    assert all(torch.equal(x, y) for x, y in zip(opt_a, opt_b))


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    ds = dataset()
    args = ft_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                   load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = ft.Trainer(model=lora_model(), args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")  # loss falls: the first is "best"
    best = peft.PeftModel.from_pretrained(gpt2_base(), trainer.state.best_model_checkpoint)
    last = peft.PeftModel.from_pretrained(gpt2_base(), str(tmp_path / "checkpoint-4"))
    batch = batch_of(ds)
    assert torch.equal(logits(trainer.model, batch), logits(best, batch))
    assert not torch.equal(logits(trainer.model, batch), logits(last, batch))


def test_save_model_merge_adapter_writes_a_plain_transformers_model(tmp_path):
    trainer = ft.Trainer(model=lora_model(), args=ft_args(tmp_path, max_steps=2), train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "merged"), merge_adapter=True)
    files = set(os.listdir(tmp_path / "merged"))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged"))
    batch = batch_of(dataset())
    torch.testing.assert_close(logits(merged, batch), logits(trainer.model, batch), atol=1e-5, rtol=1e-5)
    assert fpeft.is_peft_model(trainer.model)  # the trainer's model still has its adapter
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        fpeft.save_merged(gpt2_base(), str(tmp_path / "x"))


# -- checkpointing, accumulation, precision, sharding ------------------------------------------


def _trained(tmp_path, name, **kw):
    # SGD: AdamW's m / sqrt(v) turns 1e-9 gradient round-off on near-zero entries into lr-sized updates.
    kw = {"max_steps": 3, "optim": "sgd", "learning_rate": 0.5, "warmup_steps": 0, **kw}
    trainer = ft.Trainer(model=lora_model(), args=ft_args(tmp_path / name, **kw), train_dataset=dataset())
    trainer.train()
    return adapter_params(trainer.model)


def test_gradient_checkpointing_and_accumulation_give_the_same_adapter(tmp_path):
    # Frozen embeddings: HF needs enable_input_require_grads() for REENTRANT checkpointing; the step uses
    # non-reentrant checkpointing and differentiates w.r.t. the adapter tensors directly, so it does not.
    plain = _trained(tmp_path, "plain")
    ckpt = _trained(tmp_path, "ckpt", gradient_checkpointing=True)
    accum = _trained(tmp_path, "accum", per_device_train_batch_size=N // 2, gradient_accumulation_steps=2)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(accum[k], plain[k], atol=1e-6, rtol=0)


def test_bf16_trains_the_adapter_and_leaves_the_fp32_base_untouched(tmp_path):
    model = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = ft_args(tmp_path, max_steps=3, bf16=True, optim="sgd", learning_rate=0.5, warmup_steps=0)
    ft.Trainer(model=model, args=args, train_dataset=dataset()).train()
    fp32 = _trained(tmp_path, "fp32")
    start = adapter_params(lora_model())
    for k, v in adapter_params(model).items():
        assert v.dtype == torch.float32
        moved, diff = (fp32[k] - start[k]).abs().max(), (v - fp32[k]).abs().max()
        assert moved > 1e-3 and diff < 0.05 * moved  # bf16 compute: the fp32 run's update, to bf16 precision
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_sharded_mode_with_a_peft_model_is_refused_with_what_to_use(tmp_path):
    with pytest.raises(ValueError, match="fsdp='full_shard' with a PeftModel.*data parallel"):
        ft.Trainer(model=lora_model(), args=ft_args(tmp_path, fsdp="full_shard"), train_dataset=dataset())


# -- a population of adapters over one frozen base ----------------------------------------------


def test_population_of_lora_adapters_over_one_base_equals_separate_runs(tmp_path):
    model = lora_model()
    txf = ft.optim.inject_hyperparams(ft.optim.adamw)
    hps = [dict(learning_rate=lr, weight_decay=0.01) for lr in (1e-2, 5e-3, 2e-2, 1e-3)]
    seeds = [0, 1, 2, 3]
    state, tx = adapter_population.create_adapter_population(model, txf, hps, seeds=seeds)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(state.buffers[n].data_ptr() == p.data_ptr() for n, p in frozen.items())  # ONE base, not 4
    assert all(v.shape[0] == 4 for v in state.params.values())
    inits = P.unstack_state(state, buffers="shared")
    a0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    assert not torch.equal(inits[0].params[a0], inits[1].params[a0])  # seeds give different adapters

    # Different data per member (in_dims="per_member"), different learning rates and seeds.
    batches = [{k: torch.stack([batch_of(dataset(seed=10 * s + i))[k] for i in range(4)])
                for k in ("input_ids", "labels")} for s in range(4)]
    separate = []
    for i in range(4):
        member = TrainState.create(model, txf(**hps[i]), seed=seeds[i]).replace(
            params={k: v.clone() for k, v in inits[i].params.items()},
            opt_state=ft.tree.map(lambda x: x.clone(), inits[i].opt_state))
        step = ft.make_train_step(model, txf(**hps[i]))
        for b in batches:
            member, _ = step(member, {k: v[i] for k, v in b.items()})
        separate.append(member)
    pop_step = P.make_population_train_step(model, tx, in_dims="per_member", buffers="shared")
    for b in batches:
        state, metrics = pop_step(state, b)
    assert metrics["loss"].shape == (4,)
    for i, member in enumerate(P.unstack_state(state, buffers="shared")):
        for k in member.params:
            torch.testing.assert_close(member.params[k], separate[i].params[k], atol=1e-6, rtol=0)
    assert all(torch.equal(model.get_parameter(n), p) for n, p in frozen.items())

    # Each member is its own adapter folder, loadable by peft.
    own = adapter_params(model)
    paths = adapter_population.save_member_adapters(model, state, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["member-0", "member-1", "member-2", "member-3"]
    assert all(torch.equal(own[k], v) for k, v in adapter_params(model).items())  # model left as it was
    batch = batch_of(dataset())
    for i, path in enumerate(paths):
        loaded = peft.PeftModel.from_pretrained(gpt2_base(), path)
        member_params = {k: v for k, v in separate[i].params.items()}
        model.eval()
        with torch.no_grad():
            expected = torch.func.functional_call(model, member_params, (), {"input_ids": batch["input_ids"]}).logits
        torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)


def test_shared_buffers_must_be_one_tensor():
    model = lora_model()
    a = TrainState.create(model, ft.optim.sgd(0.1))
    b = TrainState.create(model, ft.optim.sgd(0.1), copy=True)
    with pytest.raises(P.PopulationError, match="not member 0's tensor"):
        P.stack_states([a, b], buffers="shared")
    with pytest.raises(ValueError, match="buffers must be 'stacked'"):
        P.stack_states([a, a], buffers="once")


# -- other adapter types -----------------------------------------------------------------------


def llama_base(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=24, bos_token_id=0, eos_token_id=0, pad_token_id=0))


ADAPTERS = {
    "ia3": lambda: peft.get_peft_model(gpt2_base(), peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    # LoHa adapts Linear/Conv layers (not GPT-2's Conv1D): a tiny Llama.
    "loha": lambda: peft.get_peft_model(llama_base(), peft.LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"],
                                                                       init_weights=False)),
    "prompt_tuning": lambda: peft.get_peft_model(gpt2_base(), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                       num_virtual_tokens=4)),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_other_adapter_types_train_through_the_trainer_as_a_torch_loop(kind, tmp_path):
    ds = dataset()
    model = ADAPTERS[kind]()
    reference = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = ft_args(tmp_path, max_steps=4, optim="sgd", learning_rate=0.5, weight_decay=0.0, warmup_steps=0,
                   lr_scheduler_type="constant")
    ft.Trainer(model=model, args=args, train_dataset=ds).train()

    trainable = [p for p in reference.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    reference.train()
    batch = batch_of(ds)
    for _ in range(4):
        reference(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad()
    mine, theirs = adapter_params(model), adapter_params(reference)
    assert mine and list(mine) == list(theirs)
    start = adapter_params(ADAPTERS[kind]())
    assert any(not torch.allclose(mine[k], start[k]) for k in mine)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=1e-5)
    # (prompt tuning: torch's functional_call leaves lm_head.weight a new Parameter over wte's storage, because
    # peft registers the embedding module twice; same storage, so the base is still held once.)
    own = dict(model.named_parameters())
    assert all(torch.equal(own[n], v) for n, v in frozen.items())


def test_population_trainer_trains_adapters_over_one_base_as_separate_trainers(tmp_path):
    """PopulationTrainer with a PeftModel: member i (learning rate, seed) equals an ordinary Trainer run on a
    fresh adapter that peft initialized under that seed; each member saved as its own adapter folder."""
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    ds = dataset()
    kw = dict(max_steps=3, learning_rate=1e-2, warmup_steps=1)
    members = [{"learning_rate": 1e-2, "seed": 3}, {"learning_rate": 3e-2, "seed": 4}]
    model = peft.get_peft_model(gpt2_base(), config)
    pop = ft.PopulationTrainer(ft.Trainer(model=model, args=ft_args(tmp_path / "pop", **kw), train_dataset=ds),
                               members)
    pop.train()
    paths = pop.save_member_adapters()
    assert all(pop.state.buffers[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters()
               if not p.requires_grad)
    batch = batch_of(ds)
    for i, m in enumerate(members):
        base = gpt2_base()
        torch.manual_seed(m["seed"])
        single = peft.get_peft_model(base, config)
        args = ft_args(tmp_path / f"single{i}", **{**kw, "learning_rate": m["learning_rate"]})
        ft.Trainer(model=single, args=args, train_dataset=ds).train()
        got = pop.member_states()[i].params
        for k, v in adapter_params(single).items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
        loaded = peft.PeftModel.from_pretrained(gpt2_base(), paths[i])
        torch.testing.assert_close(logits(loaded, batch), logits(single, batch), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_benchmark_runs_quick(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "lora.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "lora.py"), "--quick", "--only",
                           "population", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    pop = report["population"]
    assert pop["members"] == 4 and pop["speedup_vs_sequential"] > 0
    assert {"4 sequential steps", "population step", "_loadavg"} <= set(pop["results"])
