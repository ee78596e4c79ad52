"""Whole train step (target 2): functrain compiled+donated vs the compiled hand loop, the eager hand
loop and HF's Trainer (eager and ``torch_compile=True``), all in one run.

    python benchmarks/train_step.py            # GPT-2 4 layers, width 256, 4 heads, vocab 2048, seq 128, batch 8
    python benchmarks/train_step.py --threads 1
    python benchmarks/train_step.py --quick    # tiny model (smoke test)

Same model init, same batches, same work per step for all: forward + backward, global-norm
clip to 1.0, AdamW (weight decay 0, HF's default), linear schedule.

* ``functrain``: ``make_train_step(compile=True, donate=True, max_grad_norm=1.0)``.
* ``functrain flat``: the same with ``flat=True`` (params and moments in flat segments, the
  module's parameters views of them).
* ``functrain split`` / ``functrain flat split``: the same two with ``leafwise_update=True`` (the
  Trainer's setting): only the gradients are compiled, the update runs in place after the graph as
  torch's fused AdamW (per tensor, or one kernel per flat segment), nothing written back.
* ``compiled hand loop`` (the reference): ``torch.compile(model)``, ``loss.backward()``,
  ``clip_grad_norm_``, ``AdamW(fused=True)``, ``LambdaLR``.
* ``hand loop``: the same loop, eager.
* ``HF Trainer`` / ``HF Trainer compiled``: ``transformers.Trainer`` (``optim="adamw_torch_fused"``;
  ``torch_compile=True`` for the second), timed per step by a callback from ``on_step_begin`` to
  ``on_step_end`` (forward, backward, clip, optimizer and scheduler, not data loading); the
  ``... loop`` rows are the time between successive ``on_step_end`` calls (data loading included).

Rounds interleave the contenders; the first step of each round is dropped (the HF Trainer
builds a new optimizer per ``train()`` call). Target (issue 18): functrain <= 0.95x the compiled
hand loop.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

LR, TOTAL_STEPS = 3e-4, 10_000
REFERENCE = "compiled hand loop"


def config(quick: bool) -> dict:
    if quick:
        return dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=4)
    return dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, seq=128, batch=8)


def functrain_contender(model, batches, steps, flat: bool = False, split: bool = False):
    import functrain as ft
    from functrain.step.train import make_train_step

    tx = ft.optim.adamw(ft.schedules.linear(LR, 0, TOTAL_STEPS), weight_decay=0.0)
    step = make_train_step(model, tx, compile=True, donate=True, max_grad_norm=1.0, flat=flat, leafwise_update=split)
    state = ft.TrainState.create(model, tx, seed=0)
    box = [ft.flat.flatten_state(state, tx, model) if flat else state, 0]

    def one():
        box[0], m = step(box[0], batches[box[1] % len(batches)])
        box[1] += 1
        return m

    def run():
        return C.timed_steps(one, steps)

    return one, run


def hand_contender(model, batches, steps, compiled: bool = False, lr: float = LR, total_steps: int = TOTAL_STEPS):
    """The hand loop; ``compiled``: over ``torch.compile(model)`` (forward and backward compiled,
    the optimizer eager and fused: the strongest loop a user writes without functrain)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.linear_lambda(0, total_steps))
    model.train()
    forward = torch.compile(model) if compiled else model
    box = [0]

    def one():
        batch = batches[box[0] % len(batches)]
        box[0] += 1
        loss = forward(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run():
        return C.timed_steps(one, steps)

    return one, run


def hf_contender(model, batches, steps, batch_size, compiled: bool = False):
    """One ``Trainer.train()`` of ``steps`` steps per round; per-step times from a callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimer(C.StepTimer, TrainerCallback):
        pass

    dataset = C.ListDataset(batches)
    out_dir = tempfile.mkdtemp(prefix="hf_bench_")
    loop_times: list[float] = []

    def run():
        timer = StepTimer()
        args = TrainingArguments(out_dir, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                                 max_grad_norm=1.0, optim="adamw_torch_fused", logging_strategy="no",
                                 save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                                 torch_compile=compiled)
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer]).train()
        loop_times.extend(timer.loop_s[1:])
        return timer.step_s[1:]

    return run, loop_times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round per contender")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None,
                    help=f"contender names to run (the {REFERENCE!r} always runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 6)
    rounds = args.rounds or (2 if args.quick else 5)
    cfg = config(args.quick)
    C.quiet_transformers()
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    n_params = sum(p.numel() for p in base.parameters())
    batches = C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"])
    print(f"train step: GPT-2 {cfg}, {n_params:,} params, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {rounds} rounds x {steps} steps", flush=True)

    contenders, compile_s = {}, {}

    def add(name, make, warmup=2):
        if args.only and name not in args.only and name != REFERENCE:
            return
        t0 = time.perf_counter()
        one, run = make(copy.deepcopy(base))
        for _ in range(warmup):
            one()  # compile
        compile_s[name] = time.perf_counter() - t0
        print(f"  {name}: set up and warmed in {compile_s[name]:.1f} s", flush=True)
        contenders[name] = lambda: run()[1:]

    add("functrain", lambda m: functrain_contender(m, batches, steps))
    add("functrain flat", lambda m: functrain_contender(m, batches, steps, flat=True))
    add("functrain split", lambda m: functrain_contender(m, batches, steps, split=True))
    add("functrain flat split", lambda m: functrain_contender(m, batches, steps, flat=True, split=True))
    add("compiled hand loop", lambda m: hand_contender(m, batches, steps, compiled=True))
    add("hand loop", lambda m: hand_contender(m, batches, steps), warmup=1)
    hf_loops = {}
    for name, compiled in (("HF Trainer", False), ("HF Trainer compiled", True)):
        if not args.only or name in args.only:
            contenders[name], hf_loops[name] = hf_contender(copy.deepcopy(base), batches, steps + 1, cfg["batch"],
                                                            compiled=compiled)
    results = C.interleave(contenders, rounds)
    for name, loop in hf_loops.items():
        results[name + " loop"] = C.summarize(loop)
    loads = results.pop("_loadavg")
    print(C.table(results, REFERENCE))
    ref = results[REFERENCE]["median_ms"]
    summary = {f"{name}_vs_compiled_hand": r["median_ms"] / ref for name, r in results.items()}
    summary.update(target_functrain_vs_compiled_hand=0.95)
    print(", ".join(f"{k} = {v:.3f}" for k, v in summary.items()))
    report = {"quick": args.quick, "config": cfg, "params": n_params, "steps_per_round": steps, "rounds": rounds,
              "setup_and_warmup_s": compile_s, "results": results, "loadavg_per_round": loads, "summary": summary}
    C.write_report("train_step", report, args.out)
    return report


if __name__ == "__main__":
    main()
