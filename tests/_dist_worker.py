"""Worker for tests/test_distributed*.py, launched by torchrun / accelerate (or run as one process).

``python _dist_worker.py MODE OUT_DIR [JSON_ARGS]``; rank 0 writes ``OUT_DIR/result.json``.
Modes: ``steps`` (pure-step parity: DDP, per-rank normalizer, sharded, activation checkpointing,
bf16, optimizer bytes),
``trainer`` (a Trainer run, optionally sharded/resumed; saves the final model), ``fail`` (rank 1
raises at step 3).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functrain as ft  # noqa: E402
from functrain import distributed as fd  # noqa: E402

torch.set_num_threads(1)


def global_batches(world, per_rank, steps, seed=1):
    """Classifier batches of ``world * per_rank`` rows with ~40% labels ignored (uneven per rank)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(world * per_rank, 8, generator=g)
        y = torch.randint(0, 4, (world * per_rank,), generator=g)
        y[torch.rand(world * per_rank, generator=g) < 0.4] = -100
        out.append({"x": x, "labels": y})
    # One microbatch of rank 0 without any supervised item (step 0, rows 0 and 2 of 4 per rank).
    out[0]["labels"][0:2 * world:world] = -100
    return out


def run_steps(step, state, batches, r, world):
    for b in batches:
        state, metrics = step(state, {k: v[r::world] for k, v in b.items()})
    return state, metrics


def mode_steps(out_dir, opts):
    from step_models import MLP

    fd.init_distributed()
    r, world = fd.rank(), fd.world_size()
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=15, classes=4)  # 15 rows: uneven shards
    tx = ft.optim.adamw(1e-2, weight_decay=0.1)
    batches = global_batches(world, 4, 10)

    def fresh():
        return ft.TrainState.create(model, tx, copy=True)

    # The reference: ONE process, the whole global batch, same accumulation.
    ref, ref_m = run_steps(ft.make_train_step(model, tx, accumulate=2), fresh(), batches, 0, 1)
    result = {}
    grad_reduce, count_reduce = fd.data_parallel_hooks()
    ddp_step = ft.make_train_step(model, tx, accumulate=2, grad_reduce=grad_reduce, count_reduce=count_reduce)
    ddp, m = run_steps(ddp_step, fresh(), batches, r, world)
    result["ddp"] = ft.tree.relative_difference(ddp.params, ref.params)
    result["ddp_metrics"] = {k: float(v) for k, v in fd.reduce_metrics(m).items()}
    result["ref_last_metrics"] = {k: float(v) for k, v in ref_m.items()}
    naive_reduce, _ = fd.per_rank_mean_hooks()
    naive, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, grad_reduce=naive_reduce), fresh(), batches, r,
                         world)
    result["per_rank_normalizer"] = ft.tree.relative_difference(naive.params, ref.params)

    sharded0 = fd.shard_state(fresh())
    result["opt_bytes_sharded"] = fd.local_nbytes(sharded0.opt_state)
    result["opt_bytes_full"] = fd.local_nbytes(ref.opt_state)
    sharded, m = run_steps(ft.make_train_step(model, tx, accumulate=2, **fd.sharded_hooks()), sharded0, batches, r,
                           world)
    result["sharded_is_dtensor"] = all(fd.is_dtensor(p) for p in sharded.params.values())
    result["sharded"] = ft.tree.relative_difference(fd.unshard_state(sharded.params), ref.params)
    result["sharded_metrics"] = {k: float(v) for k, v in fd.reduce_metrics(m).items()}

    # Activation checkpointing (fc2 recomputed in the backward) from states that are not the
    # module's tensors: data parallel and sharded (params gathered for the recompute) still agree.
    ckpt_model = MLP(d_in=8, hidden=15, classes=4)
    ckpt_model.load_state_dict(model.state_dict())
    ft.checkpoint_modules(ckpt_model, lambda name, m: name == "fc2")
    ckpt_ddp, _ = run_steps(ft.make_train_step(ckpt_model, tx, accumulate=2, grad_reduce=grad_reduce,
                                               count_reduce=count_reduce), fresh(), batches, r, world)
    result["ddp_checkpointed"] = ft.tree.relative_difference(ckpt_ddp.params, ref.params)
    ckpt_sh, _ = run_steps(ft.make_train_step(ckpt_model, tx, accumulate=2, **fd.sharded_hooks()),
                           fd.shard_state(fresh()), batches, r, world)
    result["sharded_checkpointed"] = ft.tree.relative_difference(fd.unshard_state(ckpt_sh.params), ref.params)

    # bf16 compute with fp32 master weights: sharded == data parallel (same local compute).
    bf_ddp, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16", grad_reduce=grad_reduce,
                                             count_reduce=count_reduce), fresh(), batches, r, world)
    bf_sh, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16", **fd.sharded_hooks()),
                         fd.shard_state(fresh()), batches, r, world)
    bf_sh_full = fd.unshard_state(bf_sh.params)
    result["bf16_sharded_vs_ddp"] = ft.tree.relative_difference(bf_sh_full, bf_ddp.params)
    result["bf16_vs_fp32"] = ft.tree.relative_difference(bf_ddp.params, ref.params)
    result["bf16_master_dtype"] = str(next(iter(bf_sh_full.values())).dtype)
    if r == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


def make_trainer(out_dir, opts):
    from _trainer_fixtures import make_dataset, make_model

    args = ft.TrainingArguments(
        opts["output_dir"], max_steps=opts.get("max_steps", 10), per_device_train_batch_size=opts["per_device"],
        gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="linear",
        warmup_steps=2, save_strategy="steps", save_steps=opts.get("save_steps", 5), logging_steps=5,
        report_to="none", disable_tqdm=True, fsdp=opts.get("fsdp", ""), seed=3,
        eval_strategy="steps" if opts.get("eval") else "no", eval_steps=5, per_device_eval_batch_size=3)
    return ft.Trainer(model=make_model(p=0.0), args=args, train_dataset=make_dataset(n=48),
                      eval_dataset=make_dataset(n=14, seed=5) if opts.get("eval") else None)


def mode_trainer(out_dir, opts):
    trainer = make_trainer(out_dir, opts)
    trainer.train(resume_from_checkpoint=opts.get("resume"))
    trainer.save_model(os.path.join(out_dir, "final"))
    if fd.is_main_process():
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"world_size": fd.world_size(), "log_history": trainer.state.log_history}, f)


def mode_fail(out_dir, opts):
    from functrain.trainer.callbacks import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and fd.rank() == 1:
                raise RuntimeError("boom on rank 1 at step 3")

    trainer = make_trainer(out_dir, {**opts, "max_steps": 10_000, "save_steps": 10_000})
    trainer.add_callback(Boom())
    trainer.train()


def mode_sigterm_one_rank(out_dir, opts):
    """SIGTERM delivered to rank 1 only, at step 3: every rank must stop, save and return."""
    import signal

    from functrain.trainer.callbacks import TrainerCallback

    class TermRankOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and fd.rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = make_trainer(out_dir, {**opts, "save_steps": 10_000})
    trainer.add_callback(TermRankOne())
    trainer.train()
    checkpoints = sorted(p for p in os.listdir(opts["output_dir"]) if p.startswith("checkpoint-"))
    result = {"rank": fd.rank(), "global_step": trainer.state.global_step, "checkpoints": checkpoints}
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    {"steps": mode_steps, "trainer": mode_trainer, "fail": mode_fail, "sigterm": mode_sigterm_one_rank}[mode](out, options)
    fd.barrier()
    if fd.is_distributed():
        torch.distributed.destroy_process_group()
