"""Worker for tests/test_distributed*.py, launched by torchrun / accelerate (or run as one process).

``python _dist_worker.py MODE OUT_DIR [JSON_ARGS]``; rank 0 writes ``OUT_DIR/result.json``.
Modes: ``steps`` (pure-step parity: DDP, per-rank normalizer, sharded, activation checkpointing,
bf16, optimizer bytes),
``trainer`` (a Trainer run, optionally sharded/resumed; saves the final model), ``fail`` (rank 1
raises at step 3), ``exit`` (leaves with a mesh alive; the process must exit cleanly).
"""

import dataclasses
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
    result.update(sharded_in_use(model, tx, batches, r, world))
    if r == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


def sharded_in_use(model, tx, batches, r, world):
    """Per-unit gathers (FSDP semantics in use) == one process, from a state whose params differ
    from the module's own tensors; counts the all-gathers of one step (the backward re-gathers)."""
    from functrain.parallel import fsdp

    g = torch.Generator().manual_seed(7)
    base = ft.TrainState.create(model, tx, copy=True)
    start = base.replace(params={k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.params.items()})
    start = start.replace(opt_state=tx.init(start.params))
    ref, ref_m = run_steps(ft.make_train_step(model, tx, accumulate=2), start, batches, 0, 1)
    hooks = fsdp.sharded_in_use_hooks(model)
    step = ft.make_train_step(model, tx, accumulate=2, **hooks)
    sharded, m = run_steps(step, fd.shard_state(start), batches, r, world)
    out = {"in_use_units": list(hooks["param_transform"].units),
           "in_use": ft.tree.relative_difference(fd.unshard_state(sharded.params), ref.params),
           "in_use_metrics": {k: float(v) for k, v in fd.reduce_metrics(m).items()},
           "in_use_ref_metrics": {k: float(v) for k, v in ref_m.items()},
           "module_unchanged": all(torch.equal(p, base.params[k]) for k, p in model.named_parameters())}
    with GatherCount() as in_use:
        step(fd.shard_state(start), {k: v[r::world] for k, v in batches[1].items()})
    with GatherCount() as before_forward:
        ft.make_train_step(model, tx, accumulate=2, **fd.sharded_hooks())(
            fd.shard_state(start), {k: v[r::world] for k, v in batches[1].items()})
    out["gathers_in_use"], out["gathers_before_forward"] = in_use.count, before_forward.count
    bf_ddp, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16",
                                             **dict(zip(("grad_reduce", "count_reduce"), fd.data_parallel_hooks()))),
                          start, batches, r, world)
    bf_in_use, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16", **hooks),
                             fd.shard_state(start), batches, r, world)
    out["bf16_in_use_vs_ddp"] = ft.tree.relative_difference(fd.unshard_state(bf_in_use.params), bf_ddp.params)
    # A loss whose backward is NaN on a microbatch without items (0/0): rank 0's empty microbatch
    # must be masked inside the units, before the reduce-scatter, or every rank gets the NaN.
    ref_masked, _ = run_steps(ft.make_train_step(model, tx, _masked_mean_loss, accumulate=2), start, batches[:2], 0, 1)
    masked, _ = run_steps(ft.make_train_step(model, tx, _masked_mean_loss, accumulate=2, **hooks),
                          fd.shard_state(start), batches[:2], r, world)
    out["in_use_empty_microbatch"] = ft.tree.relative_difference(fd.unshard_state(masked.params), ref_masked.params)
    masked, _ = run_steps(ft.make_train_step(model, tx, _masked_mean_loss, accumulate=2, **fd.sharded_hooks()),
                          fd.shard_state(start), batches[:2], r, world)
    out["before_forward_empty_microbatch"] = ft.tree.relative_difference(fd.unshard_state(masked.params),
                                                                         ref_masked.params)
    out.update(state_from_meta(tx))
    out.update(mixed_precision_policy(model, tx, batches, start, r, world))
    return out


def mixed_precision_policy(model, tx, batches, start, r, world):
    """FSDP2's MixedPrecisionPolicy: bf16 all-gather + fp32 reduce-scatter == bf16 compute data parallel;
    a bf16 reduce-scatter moves the result. Records the dtypes the collectives ran in."""
    from step_models import MLP

    from functrain.parallel import fsdp

    ddp_hooks = dict(zip(("grad_reduce", "count_reduce"), fd.data_parallel_hooks()))
    bf_ddp, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16", **ddp_hooks), start, batches,
                          r, world)
    bf_one, _ = run_steps(ft.make_train_step(model, tx, accumulate=2, precision="bf16"), start, batches, 0, 1)
    out = {}
    for name, reduce in (("mixed_fp32_reduce", torch.float32), ("mixed_bf16_reduce", None)):
        fresh = MLP(d_in=8, hidden=15, classes=4)  # its own unit plan (the plan lives on the module)
        fresh.load_state_dict(model.state_dict())
        hooks = fsdp.sharded_in_use_hooks(fresh, mixed=fd.MixedPrecision(torch.bfloat16, reduce))
        step = ft.make_train_step(fresh, tx, accumulate=2, precision="bf16", **hooks)
        with CollectiveDtypes() as seen:
            step(fd.shard_state(start), {k: v[r::world] for k, v in batches[1].items()})
        sharded, _ = run_steps(step, fd.shard_state(start), batches, r, world)
        full = fd.unshard_state(sharded.params)
        out[name + "_vs_ddp"] = ft.tree.relative_difference(full, bf_ddp.params)
        out[name + "_vs_one"] = ft.tree.relative_difference(full, bf_one.params)
        out[name + "_dtypes"] = sorted(seen.dtypes)
        out[name + "_master"] = sorted({str(p.dtype) for p in full.values()})
    out["ddp_bf16_vs_one"] = ft.tree.relative_difference(bf_ddp.params, bf_one.params)
    return out


class CollectiveDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The (collective, dtype) pairs of the all-gathers and reduce-scatters issued under it."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = next((k for k in ("all_gather", "reduce_scatter") if k in func.name()), None)
        if kind and args and isinstance(args[0], torch.Tensor):
            self.dtypes.add(f"{kind}:{str(args[0].dtype).removeprefix('torch.')}")
        return func(*args, **(kwargs or {}))


def _masked_mean_loss(model, batch):
    labels = batch["labels"]
    per_row = torch.nn.functional.cross_entropy(model(batch["x"])["logits"], labels.clamp_min(0), reduction="none")
    mask = (labels != -100).float()
    return (per_row * mask).sum() / mask.sum()


def state_from_meta(tx):
    """A sharded state built module by module from a meta-device model == the eager model's."""
    from torch import nn

    from functrain.parallel import fsdp

    def build():
        return nn.Sequential(nn.Linear(8, 15), nn.Tanh(), nn.Linear(15, 4))

    torch.manual_seed(11)
    eager = build()
    torch.manual_seed(11)
    with torch.device("meta"):
        skeleton = build()
    state = fsdp.sharded_state_from_meta(skeleton, tx)
    return {"meta_state_equal": all(torch.equal(fd.to_local_full(state.params[k]), v)
                                    for k, v in eager.state_dict().items()),
            "meta_state_sharded": all(fd.is_dtensor(p) for p in state.params.values()),
            "meta_module_stays_meta": all(p.is_meta for p in skeleton.parameters())}


class GatherCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts all-gather collectives issued under it."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_gather" in func.name():
            self.count += 1
        return func(*args, **(kwargs or {}))


def mode_gather(out_dir, opts):
    """Distributed evaluation primitives: each rank evaluates its share of 23 variable-length
    examples (batches of 4, HF's dealing); the gathered arrays, loss and streaming metric must be
    exactly one process's."""
    import numpy as np

    from functrain.core.metrics import Accuracy, Average, Collection
    from functrain.data.loader import ResumableLoader
    from functrain.parallel.gather import EvalShard
    from functrain.trainer.evaluation import pad_and_concatenate

    fd.init_distributed()
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(23):
        t = int(torch.randint(2, 9, (1,), generator=g))
        data.append({"input_ids": torch.randint(1, 50, (t,), generator=g).tolist(), "idx": i})
    w = torch.randn(50, 5, generator=g)

    def collate(rows):
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (t - len(r["input_ids"])) for r in rows])
        labels = torch.where(ids > 0, ids % 5, -100)
        return {"input_ids": ids, "labels": labels, "idx": torch.tensor([r["idx"] for r in rows])}

    def evaluate(batches):
        preds, labels, idx = [], [], []
        loss, stream = Average.empty(), Collection({})
        for b in batches:
            logits = w[b["input_ids"]]
            mask = b["labels"] != -100
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
            loss = loss.merge(Average.from_mean(per_token[mask].mean(), mask.sum()))
            stream = stream.merge({"accuracy": Accuracy.from_batch(logits.argmax(-1), b["labels"])})
            preds.append(logits.numpy()), labels.append(b["labels"].numpy()), idx.append(b["idx"].numpy())
        return preds, labels, idx, loss, stream

    one = evaluate(ResumableLoader(data, 4, collate, shuffle=False))
    shard = EvalShard(len(data), 4)
    loader = ResumableLoader(data, 4, collate, shuffle=False, world_size=fd.world_size(), rank=fd.rank(),
                             shard_block=4)
    preds, labels, idx, loss, stream = evaluate(shard.batches(loader))
    preds, labels, idx = (pad_and_concatenate(shard.gather_batches(x)) for x in (preds, labels, idx))
    loss, stream = shard.merge(loss), shard.merge(stream)
    result = {"predictions_equal": bool(np.array_equal(preds, pad_and_concatenate(one[0]))),
              "labels_equal": bool(np.array_equal(labels, pad_and_concatenate(one[1]))),
              "order": pad_and_concatenate(idx).tolist(),
              "loss": float(loss.compute()), "loss_one": float(one[3].compute()),
              "accuracy": float(stream.compute()["accuracy"]), "accuracy_one": float(one[4].compute()["accuracy"]),
              "forwarded": shard.forwarded, "forwarded_total": shard.total(shard.forwarded)}
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump(result, f)


def mode_evaluate(out_dir, opts):
    """evaluate() and predict() with compute_metrics (optionally after training, sharded); writes
    what compute_metrics saw, the metrics, the predictions and the rows this rank ran forward on."""
    import numpy as np
    from safetensors.torch import load_file

    from _trainer_fixtures import make_dataset, make_model

    seen = []

    def compute_metrics(p):
        seen.append({"predictions": p.predictions.tolist(), "label_ids": p.label_ids.tolist()})
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean()), "rows": len(p.label_ids)}

    args = ft.TrainingArguments(out_dir, max_steps=opts.get("train_steps") or 1, per_device_train_batch_size=3,
                                per_device_eval_batch_size=4, learning_rate=1e-2, report_to="none", disable_tqdm=True,
                                save_strategy="no", fsdp=opts.get("fsdp", ""), seed=3)
    model = make_model(p=0.0)
    if opts.get("init_from"):
        model.load_state_dict(load_file(opts["init_from"]))
    rows = {"n": 0}
    model.register_forward_pre_hook(lambda m, a, kw: rows.__setitem__("n", rows["n"] + len(kw["x"])),
                                    with_kwargs=True)
    trainer = ft.Trainer(model=model, args=args, train_dataset=make_dataset(n=24), compute_metrics=compute_metrics,
                         eval_dataset=make_dataset(n=opts["n"], seed=5))
    if opts.get("train_steps"):
        trainer.train()
        trainer.save_model(os.path.join(out_dir, "final"))
        rows["n"] = 0
    metrics = trainer.evaluate()
    pred = trainer.predict(make_dataset(n=opts["n"], seed=6))
    sharded = opts.get("fsdp") and fd.is_dtensor(next(trainer.model.parameters()))
    with torch.no_grad():  # the module itself after training (sharded: each unit gathers; every rank calls it)
        direct = trainer.model(x=torch.stack([e["x"] for e in make_dataset(n=5, seed=7)]))["logits"]
    drop = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "test_runtime",
            "test_samples_per_second", "test_steps_per_second")
    result = {"eval": {k: v for k, v in metrics.items() if k not in drop and k != "epoch"},
              "test": {k: v for k, v in pred.metrics.items() if k not in drop},
              "predictions": np.asarray(pred.predictions).tolist(), "label_ids": np.asarray(pred.label_ids).tolist(),
              "seen": seen, "rows_forwarded": rows["n"] - 5,
              "direct_logits": direct.tolist(), "module_sharded": bool(sharded)}
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump(result, f)


def make_trainer(out_dir, opts):
    from _trainer_fixtures import make_dataset, make_model

    args = ft.TrainingArguments(
        opts["output_dir"], max_steps=opts.get("max_steps", 10), per_device_train_batch_size=opts["per_device"],
        gradient_accumulation_steps=opts.get("accumulate", 2), learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="linear",
        warmup_steps=2, save_strategy="steps", save_steps=opts.get("save_steps", 5), logging_steps=5,
        report_to="none", disable_tqdm=True, fsdp=opts.get("fsdp", ""), fsdp_config=opts.get("fsdp_config"), seed=3,
        bf16=opts.get("bf16", False), torch_compile=opts.get("torch_compile", False),
        eval_strategy="steps" if opts.get("eval") else "no", eval_steps=5, per_device_eval_batch_size=3)
    return ft.Trainer(model=make_model(p=0.0), args=args, train_dataset=make_dataset(n=48),
                      eval_dataset=make_dataset(n=14, seed=5) if opts.get("eval") else None)


def mode_exit(out_dir, opts):
    """Ends the way a user's script can: the process group held by a module global (and by a live
    DeviceMesh/DTensor), the last collectives on tensors Python created and dropped, no barrier."""
    global SHARDED, GROUP
    fd.init_distributed()
    GROUP = torch.distributed.group.WORLD
    SHARDED = fd.shard_tensor(torch.randn(6, 4), fd.make_mesh())
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump({"full": SHARDED.full_tensor().tolist()}, f)
    for i in range(3):
        t = torch.full((4,), float(i))
        torch.distributed.all_reduce(t)
        del t
    if opts.get("user_group"):
        _use_a_group_of_ones_own()
    if opts.get("destroy"):  # the user's own destroy_process_group() before leaving (HF's examples do)
        torch.distributed.destroy_process_group()


def _use_a_group_of_ones_own():
    """A gloo group the script makes itself (dist.new_group), used by plain and async collectives
    and by a DTensor on a mesh over it (a module global), then the script's reference dropped."""
    global USER_SHARDED
    from torch.distributed.device_mesh import DeviceMesh

    group = torch.distributed.new_group(backend="gloo")
    USER_SHARDED = fd.shard_tensor(torch.randn(6, 4), DeviceMesh.from_group(group, "cpu"))
    USER_SHARDED.full_tensor()
    for i in range(3):
        t = torch.full((4,), float(i))
        torch.distributed.all_reduce(t, group=group)
        del t
    torch.distributed.all_reduce(torch.ones(1000), group=group, async_op=True).wait()
    del group


class DeepClassifier(torch.nn.Module):
    """A deep MLP classifier (forward(x, labels) -> {"loss", "logits"}) for start-up memory."""

    def __init__(self, layers, width, classes=3):
        super().__init__()
        blocks = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def _status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def mode_meta_start(out_dir, opts):
    """A sharded Trainer given model_init (built on meta, shards materialized) or the whole model:
    per-rank peak memory growth at start-up (VmHWM at on_train_begin, the state built) and the
    final weights."""
    from _trainer_fixtures import make_dataset

    from functrain.trainer.callbacks import TrainerCallback

    fd.init_distributed()
    layers, width = opts["layers"], opts["width"]

    def model_init():
        torch.manual_seed(opts.get("model_seed", 0))
        return DeepClassifier(layers, width)

    def model_kwargs():
        if opts.get("given_meta"):  # a skeleton handed over; initialized from the Trainer's seed
            with torch.device("meta"):
                return {"model": DeepClassifier(layers, width)}
        return {"model_init": model_init} if opts["meta"] else {"model": model_init()}

    peak = {}

    class StartUpPeak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            peak["growth_mb"] = _status_mb("VmHWM") - baseline

        def on_save(self, args, state, control, model=None, **kwargs):  # no rank fills its module
            peak["module_sharded_after_save"] = _holds_half(model)

    args = ft.TrainingArguments(opts["output_dir"], max_steps=4, per_device_train_batch_size=3, learning_rate=1e-2,
                                optim="sgd", report_to="none", disable_tqdm=True, save_strategy="steps", save_steps=2,
                                fsdp="full_shard", seed=3)
    data = make_dataset(n=24, dim=width)
    # Everything a Trainer imports and allocates once is loaded by a tiny run first; then the peak is
    # reset (clear_refs 5), so the figure is the start-up's own.
    ft.Trainer(model=DeepClassifier(1, width), args=dataclasses.replace(args, output_dir=args.output_dir + "-warm",
                                                                       max_steps=1, fsdp="", save_strategy="no"),
               train_dataset=data).train()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_mb("VmRSS")
    trainer = ft.Trainer(args=args, train_dataset=data, callbacks=[StartUpPeak()], **model_kwargs())
    built_on_meta = all(p.is_meta for p in trainer.model.parameters())
    trainer.train()
    sharded_at_end = _holds_half(trainer.model)
    trainer.save_model(os.path.join(out_dir, "final"))
    untrained = ft.Trainer(args=args, **model_kwargs())
    eval_loss = untrained.evaluate(data[:8])["eval_loss"]  # before any training: meta, from the shards
    model_mb = sum(p.numel() * 4 for p in DeepClassifier(layers, width).parameters()) / 2**20
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump({"startup_growth_mb": peak["growth_mb"], "model_mb": model_mb, "built_on_meta": built_on_meta,
                   "eval_loss_before": eval_loss, "module_sharded_after_save": peak["module_sharded_after_save"],
                   "module_sharded_at_end": sharded_at_end}, f)


def _holds_half(model):
    """Every parameter is a DTensor shard holding about half the rows (2 ranks)."""
    params = list(model.parameters())
    return all(fd.is_dtensor(p) and p.to_local().shape[0] <= (p.shape[0] + 1) // 2 for p in params)


def mode_trainer(out_dir, opts):
    trainer = make_trainer(out_dir, opts)
    trainer.train(resume_from_checkpoint=opts.get("resume"))
    trainer.save_model(os.path.join(out_dir, "final"))
    if fd.is_main_process():
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"world_size": fd.world_size(), "log_history": trainer.state.log_history,
                       "units": _units_of(trainer.model)}, f)


def mode_gpt2(out_dir, opts):
    """A tiny GPT-2 (tied embeddings, no dropout) trained 3 steps, sharded on 2 ranks (or 1 process
    with the same global batch); saved with save_model; trainer.model's own logits afterwards."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fd.init_distributed()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    args = ft.TrainingArguments(os.path.join(out_dir, "run"), max_steps=3, per_device_train_batch_size=4 // fd.world_size(),
                                learning_rate=1e-2, report_to="none", disable_tqdm=True, save_strategy="steps",
                                save_steps=3, fsdp="full_shard" if fd.is_distributed() else "", seed=0)
    trainer = ft.Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "final"))
    trainer.model.eval()
    with torch.no_grad():  # sharded: a collective (each unit gathers its shards)
        logits = trainer.model(input_ids=ids[:2])["logits"]
    if fd.is_main_process():
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"logits": logits.tolist(), "sharded": fd.is_dtensor(trainer.model.transformer.wte.weight),
                       "tied": trainer.model.lm_head.weight is trainer.model.transformer.wte.weight}, f)


def _units_of(model):
    from functrain.parallel import fsdp

    return [name for name, m in model.named_modules() if fsdp.is_unit(m)]


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


def mode_main_process_first(out_dir, opts):
    """HF's ``with training_args.main_process_first():`` before any Trainer exists: rank 0's block
    finishes (it writes a file, slowly) before rank 1's block starts (it reads the file)."""
    import time

    from functrain import TrainingArguments

    args = TrainingArguments(os.path.join(out_dir, "run"), use_cpu=True)
    assert args.parallel_mode.value == "distributed" and not fd.is_distributed()  # no group joined yet
    marker = os.path.join(out_dir, "main-done")
    with args.main_process_first(desc="preprocessing"):
        if args.process_index == 0:
            time.sleep(1.0)
            with open(marker, "w") as f:
                f.write("done")
            seen = True
        else:
            seen = os.path.exists(marker)
    with open(os.path.join(out_dir, f"result-{args.process_index}.json"), "w") as f:
        json.dump({"saw_main_done": seen, "distributed": fd.is_distributed()}, f)


def mode_sharded_dropout(out_dir, opts):
    """fsdp="full_shard" through the Trainer on GPT-2 with its default dropout, eager and compiled,
    each with and without gradient_checkpointing: the full params after 4 steps, and the losses."""
    from functrain import Trainer, TrainingArguments
    from functrain.parallel.fsdp import full_state_dict
    from step_models import gpt2

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 16), generator=g)
    rows = [{"input_ids": r, "labels": r} for r in ids]
    result = {}
    for compile_ in (False, True):
        for checkpointing in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            args = TrainingArguments(os.path.join(out_dir, f"run-{compile_}-{checkpointing}"), use_cpu=True,
                                     per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, logging_steps=1,
                                     save_strategy="no", report_to="none", disable_tqdm=True, fsdp="full_shard",
                                     torch_compile=compile_, gradient_checkpointing=checkpointing)
            trainer = Trainer(model=gpt2(dropout=0.1), args=args, train_dataset=rows)
            trainer.train()
            full = full_state_dict(trainer.model)
            result[f"{compile_}-{checkpointing}"] = {
                "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "params": {k: v.tolist() for k, v in full.items()} if fd.is_main_process() else None}
    if fd.is_main_process():
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    {"steps": mode_steps, "trainer": mode_trainer, "fail": mode_fail, "sigterm": mode_sigterm_one_rank,
     "gather": mode_gather, "evaluate": mode_evaluate, "gpt2": mode_gpt2, "exit": mode_exit, "meta_start": mode_meta_start,
     "main_process_first": mode_main_process_first, "sharded_dropout": mode_sharded_dropout}[mode](out, options)
    if mode != "exit":
        fd.barrier()
