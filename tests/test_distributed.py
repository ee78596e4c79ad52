"""Data parallel and sharded training on 2 CPU processes (gloo), launched by torchrun / accelerate.

Each launch runs tests/_dist_worker.py; rank 0 writes result.json, which the test checks against
single-process references (computed in the worker or in this process).
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import functrain as ft
from functrain import distributed as fd

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")
LAUNCH_TIMEOUT = 240  # seconds; a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(mode, out_dir, opts=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), WORKER, mode, str(out_dir), json.dumps(opts or {})]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def read_result(out_dir):
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)


def run_here(mode, out_dir, opts):
    """The worker's mode in this (single) process: the 1-process reference."""
    sys.path.insert(0, HERE)
    import _dist_worker

    {"trainer": _dist_worker.mode_trainer, "evaluate": _dist_worker.mode_evaluate,
     "gpt2": _dist_worker.mode_gpt2}[mode](str(out_dir), opts)


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


# -- the pure step ----------------------------------------------------------------------------------


def test_step_parity_ddp_and_sharded(tmp_path):
    """2 ranks x B == 1 process x 2B for 10 AdamW steps, accumulation 2, uneven padding."""
    check(torchrun("steps", tmp_path))
    r = read_result(tmp_path)
    # Data parallel with the global item count: equal to the single process.
    assert r["ddp"] <= 1e-5
    # The per-rank normalizer (local mean, ranks averaged) is measurably different: the test can fail.
    assert r["per_rank_normalizer"] >= 1e-3
    # Sharded (DTensor Shard(0), uneven 15-row params) gives the same params.
    assert r["sharded_is_dtensor"]
    assert r["sharded"] <= 1e-5
    # Activation checkpointing recomputes with the state's (gathered) params, not the module's.
    assert r["ddp_checkpointed"] <= 1e-5
    assert r["sharded_checkpointed"] <= 1e-5
    # Each rank holds about half the optimizer state (15 rows split 8 + 7, plus 0-d counters).
    assert 0.45 <= r["opt_bytes_sharded"] / r["opt_bytes_full"] <= 0.56
    # Reduced metrics are the global ones.
    for key in ("loss", "num_items", "grad_norm"):
        assert r["ddp_metrics"][key] == pytest.approx(r["ref_last_metrics"][key], rel=1e-5)
        assert r["sharded_metrics"][key] == pytest.approx(r["ref_last_metrics"][key], rel=1e-5)
    # bf16 compute with fp32 master weights: sharded == data parallel; bf16 moves the result a little.
    assert r["bf16_master_dtype"] == "torch.float32"
    assert r["bf16_sharded_vs_ddp"] <= 1e-6
    assert 0 < r["bf16_vs_fp32"] < 5e-2
    # Per-unit gathers (FSDP semantics in use), from a state unlike the module's own tensors.
    assert r["in_use_units"] == ["fc1", "fc2"]
    assert r["in_use"] <= 1e-5
    assert r["module_unchanged"]
    for key in ("loss", "num_items", "grad_norm"):
        assert r["in_use_metrics"][key] == pytest.approx(r["in_use_ref_metrics"][key], rel=1e-5)
    # Each unit gathers in forward and again in backward (recomputed, not kept): 2 microbatches x
    # 4 tensors x 2, where gathering everything before the forward does it once.
    assert r["gathers_before_forward"] == 8
    assert r["gathers_in_use"] == 16
    assert r["bf16_in_use_vs_ddp"] <= 1e-6
    # A microbatch whose loss has a NaN gradient (0/0, no items) is masked before the reduce-scatter.
    assert r["in_use_empty_microbatch"] <= 1e-5 and r["before_forward_empty_microbatch"] <= 1e-5
    # FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): gathers run in bf16, the
    # reduce-scatters in fp32, the shards stay fp32; the numbers are bf16-compute data parallel's exactly
    # and as far from a 1-process bf16 run as data parallel is. A bf16 reduce-scatter moves them.
    assert r["mixed_fp32_reduce_dtypes"] == ["all_gather:bfloat16", "reduce_scatter:float32"]
    assert r["mixed_bf16_reduce_dtypes"] == ["all_gather:bfloat16", "reduce_scatter:bfloat16"]
    assert r["mixed_fp32_reduce_master"] == r["mixed_bf16_reduce_master"] == ["torch.float32"]
    assert r["mixed_fp32_reduce_vs_ddp"] == 0.0
    assert r["mixed_fp32_reduce_vs_one"] == r["ddp_bf16_vs_one"] < 1e-3
    assert r["mixed_bf16_reduce_vs_ddp"] > 1e-5
    # Start-up without the whole model: shards built module by module from a meta-device model.
    assert r["meta_state_equal"] and r["meta_state_sharded"] and r["meta_module_stays_meta"]


# -- the Trainer: sharded run, resume across world sizes --------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 1-process run (global batch 12 = 6 x 2 accumulation), checkpoint at step 5."""
    out = tmp_path_factory.mktemp("ref")
    run_here("trainer", out, {"output_dir": str(out / "run"), "per_device": 6, "eval": True})
    return out


@pytest.mark.slow
def test_sharded_trainer_matches_one_process_and_resumes_on_one(tmp_path, reference):
    out2 = tmp_path / "two"
    check(torchrun("trainer", out2, {"output_dir": str(out2 / "run"), "per_device": 3, "fsdp": "full_shard",
                                     "fsdp_config": {"transformer_layer_cls_to_wrap": ["Sequential"]},
                                     "eval": True}))
    assert read_result(out2)["units"] == ["net"]  # fsdp_config's class is the one unit, gathered where used
    ref = final_weights(reference)
    assert ft.tree.relative_difference(final_weights(out2), ref) <= 1e-5
    # Logged train loss and eval loss (reduced over ranks, weighted by items) equal the 1-process ones.
    logs2, logs1 = read_result(out2)["log_history"], read_result(reference)["log_history"]
    for key in ("loss", "eval_loss"):
        a = [e[key] for e in logs2 if key in e]
        b = [e[key] for e in logs1 if key in e]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-5)
    ckpt = out2 / "run" / "checkpoint-5"
    assert sorted(p.name for p in ckpt.glob("train_state-*")) == ["train_state-00000-of-00002.safetensors",
                                                                  "train_state-00001-of-00002.safetensors"]
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.metadata"))
    # 2 -> 1: resume the sharded checkpoint in one process.
    out1 = tmp_path / "resumed"
    os.makedirs(out1 / "run")
    shutil.copytree(ckpt, out1 / "run" / "checkpoint-5")
    run_here("trainer", out1, {"output_dir": str(out1 / "run"), "per_device": 6, "eval": True, "resume": True})
    assert ft.tree.relative_difference(final_weights(out1), ref) <= 1e-5


@pytest.mark.slow
def test_sharded_trainer_with_bf16_gathers_equals_bf16_data_parallel(tmp_path):
    """bf16=True + fsdp_config's mixed_precision_policy (bf16 all-gather, fp32 reduce-scatter) through the
    Trainer: the same final weights as the bf16 data-parallel run."""
    policy = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    runs = {"ddp": {}, "sharded": {"fsdp": "full_shard", "fsdp_config": {"mixed_precision_policy": policy}}}
    for name, extra in runs.items():
        out = tmp_path / name
        check(torchrun("trainer", out, {"output_dir": str(out / "run"), "per_device": 3, "bf16": True,
                                        "save_steps": 10_000, **extra}))
    sharded, ddp = final_weights(tmp_path / "sharded"), final_weights(tmp_path / "ddp")
    assert ft.tree.relative_difference(sharded, ddp) <= 1e-6


def test_sharded_pretrained_model_with_tied_weights_saves_the_one_process_weights(tmp_path):
    """A transformers model (tiny GPT-2, tied embeddings) trained sharded on 2 ranks: afterwards
    trainer.model holds DTensor shards (the tie kept) and still runs; save_model writes what one
    process writes (same keys: the tied alias dropped; weights within 1e-5), and from_pretrained on
    it gives trainer.model's own logits."""
    from transformers import GPT2LMHeadModel

    check(torchrun("gpt2", tmp_path / "two"))
    run_here("gpt2", tmp_path / "one", {})
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert sorted(two) == sorted(one) and ft.tree.relative_difference(two, one) <= 1e-5
    result = read_result(tmp_path / "two")
    assert result["sharded"] and result["tied"]
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "two" / "final").eval()
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))[:2]
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
    assert torch.allclose(torch.tensor(result["logits"]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_sharded_trainer_with_bf16_gathers_equals_the_eager_run(tmp_path):
    """torch_compile=True + fsdp_config's mixed_precision_policy (bf16 all-gather, fp32 reduce-scatter),
    4 steps on 2 ranks: the eager sharded bf16 run's weights within bf16 rounding of fused kernels
    (measured 3.2e-5 relative). It failed to compile before ("remat only supports one such region"). Compiled, the gathers happen before the forward (torch cannot
    recompute them unit by unit); the eager run gathers unit by unit."""
    policy = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    common = {"per_device": 3, "bf16": True, "save_steps": 10_000, "max_steps": 4, "accumulate": 1,
              "fsdp": "full_shard", "fsdp_config": {"mixed_precision_policy": policy}}
    for name, extra in (("eager", {}), ("compiled", {"torch_compile": True})):
        out = tmp_path / name
        check(torchrun("trainer", out, {"output_dir": str(out / "run"), **common, **extra}))
    compiled, eager = final_weights(tmp_path / "compiled"), final_weights(tmp_path / "eager")
    assert ft.tree.relative_difference(compiled, eager) <= 1e-4


@pytest.mark.slow
def test_sharded_trainer_with_model_init_never_builds_the_whole_model(tmp_path):
    """fsdp + model_init: the model is built on the meta device and each rank materializes its shards
    module by module. Per-rank peak memory growth of the start-up (VmHWM with glibc returning freed
    blocks, MALLOC_MMAP_THRESHOLD_) stays near half the model plus one layer; built whole it is the
    model plus the shards. The trained weights are the whole-model run's, bitwise."""
    results = {}
    for meta in (True, False):
        out = tmp_path / str(meta)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), WORKER, "meta_start", str(out),
               json.dumps({"output_dir": str(out / "run"), "meta": meta, "layers": 8, "width": 768})]
        check(subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                             env={**_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}))
        results[meta] = [json.loads((out / f"result-{r}.json").read_text()) for r in (0, 1)]
    model_mb = results[True][0]["model_mb"]
    assert all(r["built_on_meta"] for r in results[True]) and not any(r["built_on_meta"] for r in results[False])
    # The module holds its shards (DTensor) on every rank, at saves and after training: no rank
    # materializes the whole model (the writer gets the full weights one tensor at a time).
    assert all(r["module_sharded_after_save"] and r["module_sharded_at_end"] for r in results[True])
    assert all(r["startup_growth_mb"] < 0.7 * model_mb for r in results[True])  # measured ~0.6x
    assert all(r["startup_growth_mb"] > 1.2 * model_mb for r in results[False])  # measured ~1.5x
    # evaluate() before train() runs on the shards and gives the whole model's loss.
    assert results[True][0]["eval_loss_before"] == pytest.approx(results[False][0]["eval_loss_before"], rel=1e-6)
    meta_weights, whole_weights = final_weights(tmp_path / "True"), final_weights(tmp_path / "False")
    assert sorted(meta_weights) == sorted(whole_weights)
    assert all(torch.equal(meta_weights[k], v) for k, v in whole_weights.items())


def test_sharded_trainer_with_a_model_given_on_meta_initializes_its_shards(tmp_path):
    """A model handed to the Trainer on the meta device (fsdp): each rank materializes and
    initializes its shards from the Trainer's seed, as the same model built on the CPU after
    set_seed(args.seed) (seed 3 here) would be; trained, the weights are that run's, bitwise."""
    for name, opts in (("given", {"meta": True, "given_meta": True}), ("whole", {"meta": False, "model_seed": 3})):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), WORKER, "meta_start", str(out),
               json.dumps({"output_dir": str(out / "run"), "layers": 3, "width": 64, **opts})]
        check(subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env()))
    given = [json.loads((tmp_path / "given" / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["built_on_meta"] for r in given)
    assert all(r["module_sharded_after_save"] and r["module_sharded_at_end"] for r in given)
    given_weights, whole_weights = final_weights(tmp_path / "given"), final_weights(tmp_path / "whole")
    assert sorted(given_weights) == sorted(whole_weights)
    assert all(torch.equal(given_weights[k], v) for k, v in whole_weights.items())


@pytest.mark.slow
def test_accelerate_launch_resumes_one_process_checkpoint_on_two(tmp_path, reference):
    """1 -> 2 through `accelerate launch` (2 CPU processes): sharded resume of a 1-process checkpoint."""
    shutil.copytree(reference / "run" / "checkpoint-5", tmp_path / "run" / "checkpoint-5")
    opts = {"output_dir": str(tmp_path / "run"), "per_device": 3, "fsdp": "full_shard", "eval": True, "resume": True}
    # accelerate 1.15 runs ONE process for `--cpu --num_processes 2` (multi-CPU needs mpirun); with
    # --multi_gpu it launches torchrun-style workers, and ACCELERATE_USE_CPU=1 keeps them on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), WORKER, "trainer", str(tmp_path), json.dumps(opts)]
    env = {**_env(), "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    check(subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env))
    assert read_result(tmp_path)["world_size"] == 2
    assert ft.tree.relative_difference(final_weights(tmp_path), final_weights(reference)) <= 1e-5


@pytest.mark.slow
def test_two_simulated_nodes_equal_one_process(tmp_path, reference):
    """Two torchrun agents as two "nodes" (one process each, static rendezvous on 127.0.0.1)."""
    port = free_port()
    opts = {"output_dir": str(tmp_path / "run"), "per_device": 3, "eval": True}

    def node(rank):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               WORKER, "trainer", str(tmp_path), json.dumps(opts)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert read_result(tmp_path)["world_size"] == 2
    assert ft.tree.relative_difference(final_weights(tmp_path), final_weights(reference)) <= 1e-5


# -- exit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [{}, {"destroy": True}], ids=["atexit", "user_destroys"])
def test_ranks_exit_cleanly_with_a_mesh_alive(tmp_path, opts):
    """A gloo worker thread keeps its last collective's tensors until the group is destroyed; a mesh
    keeps the group past destroy_process_group, into interpreter finalization, where freeing them
    aborted the process ("terminate called without an active exception") every time."""
    proc = torchrun("exit", tmp_path, opts)
    log = proc.stdout + proc.stderr
    assert "terminate called" not in log and proc.returncode == 0, log[-4000:]


def test_ranks_exit_cleanly_after_using_a_group_of_their_own(tmp_path):
    """A script's own gloo group (dist.new_group; a DTensor on a mesh over it kept in a module
    global, the script's reference dropped) is kept past exit like functrain's groups; three
    launches, every rank exits 0 without "terminate called"."""
    for attempt in range(3):
        os.makedirs(tmp_path / str(attempt))
        proc = torchrun("exit", tmp_path / str(attempt), {"user_group": True})
        log = proc.stdout + proc.stderr
        assert "terminate called" not in log and proc.returncode == 0, f"attempt {attempt}: " + log[-4000:]


# -- failures -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_rank_raising_ends_every_rank(tmp_path):
    proc = torchrun("fail", tmp_path, {"output_dir": str(tmp_path / "run"), "per_device": 3})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert log.count("RuntimeError: boom on rank 1 at step 3") == 1, log[-4000:]
    # torchrun's summary: both workers ended with a non-zero exit code (the other one stopped too).
    codes = [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", log, flags=re.M)]
    assert len(codes) == 2 and all(c != 0 for c in codes), log[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint_that_resumes_bitwise(tmp_path):
    opts = {"output_dir": str(tmp_path / "run"), "per_device": 3, "max_steps": 10}
    check(torchrun("sigterm", tmp_path, opts))  # exits 0: no rank hung until ddp_timeout
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    # Rank 1 was signalled after step 3; the ranks agree one step later and stop together.
    assert [r["global_step"] for r in results] == [4, 4]
    assert results[0]["checkpoints"] == ["checkpoint-4"]
    # The checkpoint resumes (2 ranks) to exactly the params of an uninterrupted 2-rank run.
    check(torchrun("trainer", tmp_path, {**opts, "save_steps": 10_000, "resume": True}))
    resumed = final_weights(tmp_path)
    straight = tmp_path / "straight"
    check(torchrun("trainer", straight, {**opts, "output_dir": str(straight / "run"), "save_steps": 10_000}))
    assert all(torch.equal(resumed[k], v) for k, v in final_weights(straight).items())


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "outside"),
    ({"WORLD_SIZE": "two"}, "must be an integer"),
])
def test_launch_misconfiguration_is_a_clear_error(monkeypatch, env, message):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(fd.DistributedLaunchError, match=message):
        fd.init_distributed()


def test_nccl_without_gpus_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(fd.DistributedLaunchError, match="needs CUDA"):
        fd.init_distributed("nccl")


def test_single_process_helpers_and_args():
    assert not fd.is_distributed() and fd.rank() == 0 and fd.world_size() == 1 and fd.is_main_process()
    m = {"loss": torch.tensor(1.5), "num_items": torch.tensor(3)}
    assert {k: float(v) for k, v in fd.reduce_metrics(m).items()} == {"loss": 1.5, "num_items": 3.0}
    assert ft.TrainingArguments("o", fsdp=True).sharded
    assert ft.TrainingArguments("o", fsdp="full_shard auto_wrap").sharded
    assert not ft.TrainingArguments("o").sharded
    with pytest.raises(ValueError, match="fsdp option 'offload'"):
        ft.TrainingArguments("o", fsdp="full_shard offload")
    with pytest.raises(ValueError, match="ddp_backend"):
        ft.TrainingArguments("o", ddp_backend="tcp")


def test_fsdp_mixed_precision_policy_arguments():
    """fsdp_config's mixed_precision_policy (accelerate's dict or torch's MixedPrecisionPolicy) -> the
    gather/reduce dtypes; bf16 gathers need bf16=True; unknown keys and dtypes are errors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from functrain.parallel.fsdp import mixed_precision_of

    def policy(value, **kw):
        args = ft.TrainingArguments("o", fsdp="full_shard", fsdp_config={"mixed_precision_policy": value}, **kw)
        return mixed_precision_of(args.fsdp_config)

    assert policy({"param_dtype": "bfloat16", "reduce_dtype": "float32"}, bf16=True) == (torch.bfloat16, torch.float32)
    assert policy(MixedPrecisionPolicy(param_dtype=torch.bfloat16), bf16=True) == (torch.bfloat16, None)
    assert policy({"param_dtype": None}) is None
    with pytest.raises(ValueError, match="set bf16=True"):
        policy({"param_dtype": "bf16"})
    with pytest.raises(ValueError, match="'cast_inputs'"):
        policy({"param_dtype": "bf16", "cast_inputs": True}, bf16=True)
    with pytest.raises(ValueError, match="is not a dtype"):
        policy({"param_dtype": "bf17"}, bf16=True)
    with pytest.raises(ValueError, match="fp16 compute"):
        policy({"param_dtype": "float16"}, fp16=True)


def test_compiled_step_refuses_per_unit_gathers_in_bf16():
    """make_train_step(compile=True) with per-unit mixed-precision gathers: a clear refusal naming
    what works (inductor fails on them with "remat only supports one such region")."""
    from torch import nn

    from functrain.parallel.fsdp import shard_in_use

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    units = shard_in_use(model, mixed=fd.MixedPrecision(torch.bfloat16, torch.float32))
    with pytest.raises(ValueError, match="mixed-precision gathers.*gather_params"):
        ft.make_train_step(model, ft.optim.sgd(0.1), lambda m, b: m(b["x"]).sum(), compile=True,
                           param_transform=units)


# -- distributed evaluation -------------------------------------------------------------------------


def test_each_rank_evaluates_its_share_and_gathers_the_single_process_arrays(tmp_path):
    """23 variable-length examples in batches of 4 on 2 ranks (HF's dealing, tail padded by
    wrapping): gathered predictions/labels, eval loss and a streaming metric equal one process's."""
    check(torchrun("gather", tmp_path))
    results = [json.load(open(tmp_path / f"result-{r}.json")) for r in range(2)]
    for r in results:
        assert r["predictions_equal"] and r["labels_equal"]
        assert r["order"] == list(range(23))  # dataset order, padding duplicates dropped
        assert r["loss"] == pytest.approx(r["loss_one"], rel=1e-12)
        assert r["accuracy"] == r["accuracy_one"]
        assert r["forwarded_total"] == 23
    # Blocks of 4 dealt round-robin: rank 0 takes rows 0-3, 8-11, 16-19; rank 1 4-7, 12-15, 20-22.
    assert [r["forwarded"] for r in results] == [12, 11]


@pytest.mark.slow
@pytest.mark.parametrize("n, opts", [(23, {}), (17, {"fsdp": "full_shard", "train_steps": 2})],
                         ids=["data_parallel", "sharded_after_training"])
def test_evaluate_and_predict_on_two_ranks_give_the_single_process_results(tmp_path, n, opts):
    """Each rank runs forward on its share; compute_metrics, metrics and predictions equal one
    process's exactly. (17 rows in batches of 4: rank 1's last batch is padding only; sharded, it
    still runs its gathers and is dropped.)"""
    check(torchrun("evaluate", tmp_path, {"n": n, **opts}))
    ranks = [json.load(open(tmp_path / f"result-{r}.json")) for r in range(2)]
    init = str(tmp_path / "final" / "model.safetensors") if opts.get("train_steps") else None
    os.makedirs(tmp_path / "one")
    run_here("evaluate", tmp_path / "one", {"n": n, "init_from": init})
    one = json.load(open(tmp_path / "one" / "result-0.json"))
    assert one["rows_forwarded"] == 2 * n
    for r in ranks:
        assert r["seen"] == one["seen"]  # compute_metrics got the single-process arrays
        assert r["predictions"] == one["predictions"] and r["label_ids"] == one["label_ids"]
        assert r["test"]["test_accuracy"] == one["test"]["test_accuracy"]
        assert r["eval"]["eval_accuracy"] == one["eval"]["eval_accuracy"] and r["eval"]["eval_rows"] == n
        assert r["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], rel=1e-6)
        # trainer.model itself (sharded: its params are DTensor shards) gives the 1-process outputs.
        assert r["module_sharded"] == bool(opts.get("fsdp"))
        assert torch.allclose(torch.tensor(r["direct_logits"]), torch.tensor(one["direct_logits"]), rtol=1e-6, atol=1e-7)
    # Per-device batches of 4 dealt round-robin, for evaluate + predict: each rank forwarded its
    # share (23: 12 + 11 rows each time); 17: 9 + 8, and rank 1's padding-only batch of 4 runs
    # (sharded) with its result dropped.
    expected = [2 * 12, 2 * 11] if n == 23 else [2 * 9, 2 * (8 + 4)]
    assert [r["rows_forwarded"] for r in ranks] == expected


def test_main_process_first_runs_the_main_process_block_before_the_others(tmp_path):
    """``with training_args.main_process_first():`` (every HF example script) before any Trainer:
    it joins the launcher's group and rank 1 enters its block only after rank 0 left its own."""
    check(torchrun("main_process_first", tmp_path))
    for rank in (0, 1):
        with open(os.path.join(tmp_path, f"result-{rank}.json")) as f:
            result = json.load(f)
        assert result == {"saw_main_done": True, "distributed": True}, (rank, result)


def test_main_process_first_in_one_process_just_runs_the_block(tmp_path):
    from functrain import TrainingArguments

    args = TrainingArguments(str(tmp_path))
    assert args.parallel_mode.value == "not_parallel" and args.ddp_timeout_delta.total_seconds() == args.ddp_timeout
    ran = []
    with args.main_process_first(local=False, desc="tokenizing"):
        ran.append(True)
    assert ran == [True] and not fd.is_distributed()


def test_sharded_trainer_with_dropout_and_gradient_checkpointing_eager_and_compiled(tmp_path):
    """fsdp="full_shard" + GPT-2's dropout, with and without gradient_checkpointing, eager and
    compiled. The units' own recomputation and transformers' checkpoint nested read the shards (a
    DTensor error in the first backward); compiled per-unit recomputation cannot replay dropout
    (torch 2.13). Checkpointing must not change the numbers: each pair is equal bitwise."""
    check(torchrun("sharded_dropout", tmp_path))
    r = read_result(tmp_path)
    for compiled in ("False", "True"):
        plain, checkpointed = r[f"{compiled}-False"], r[f"{compiled}-True"]
        assert len(plain["loss"]) == 4 and all(math.isfinite(x) for x in plain["loss"])
        assert checkpointed["loss"] == plain["loss"], compiled
        assert checkpointed["params"] == plain["params"], compiled
