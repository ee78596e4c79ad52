"""Compiled donated step, two ways, vs a compiled hand loop: time per step (issue 18).

    python benchmarks/compiled_update.py              # GPT-2 4 layers, width 256, vocab 2048, seq 128, batch 8
    python benchmarks/compiled_update.py --quick      # tiny model (smoke test)

* ``whole graph``: ``make_train_step(compile=True, donate=True)``: forward, backward, clip and
  AdamW in one graph; the new params and optimizer state come out of it and are written back
  after it (two copies of them alive at the graph's end).
* ``split``: the same with ``leafwise_update=True`` (what the Trainer builds for AdamW): only the
  window's gradients are compiled, the update runs after the graph in place, ~1/8 of the
  parameters at a time (one copy of params and optimizer state, plus one group's temporaries).
* ``hand loop``: ``torch.compile(model)``, ``loss.backward()``, ``clip_grad_norm_``,
  ``AdamW(fused=True)``, ``LambdaLR`` (the strongest user alternative, what HF's Trainer with
  ``torch_compile=True`` runs).

Same model init and batches, clip 1.0, AdamW with weight decay 0, linear schedule. Contenders
interleave round by round; the first step of a round is dropped; medians; load per round.
``--clock cpu`` times process CPU time instead of wall time (1 thread: on a loaded machine wall
time measures the other jobs).
"""

from __future__ import annotations

import argparse
import copy

import torch

try:
    from . import _common as C
    from . import train_step as TS
except ImportError:
    import _common as C
    import train_step as TS

LR, TOTAL_STEPS = 3e-4, 10_000


def config(quick: bool) -> dict:
    if quick:
        return dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=4)
    return dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, seq=128, batch=8)


def functrain_contender(model, batches, steps, clock, leafwise: bool):
    import functrain as ft
    from functrain.step.train import make_train_step

    tx = ft.optim.adamw(ft.schedules.linear(LR, 0, TOTAL_STEPS), weight_decay=0.0)
    step = make_train_step(model, tx, compile=True, donate=True, max_grad_norm=1.0, leafwise_update=leafwise)
    box = [ft.TrainState.create(model, tx, seed=0), 0]

    def one():
        box[0], m = step(box[0], batches[box[1] % len(batches)])
        box[1] += 1
        return m

    return one, lambda: C.timed_steps(one, steps, clock=clock)[1:]


def hand_contender(model, batches, steps, clock):
    one, _ = TS.hand_contender(model, batches, steps, compiled=True, lr=LR, total_steps=TOTAL_STEPS)
    return one, lambda: C.timed_steps(one, steps, clock=clock)[1:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round per contender")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=list(C.CLOCKS), default="wall",
                    help="cpu: process CPU time (1 thread), for a loaded machine where wall time measures other jobs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 7)
    rounds = args.rounds or (2 if args.quick else 5)
    cfg = config(args.quick)
    C.quiet_transformers()
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    batches = C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"])
    print(f"compiled update: GPT-2 {cfg}, {torch.get_num_threads()} threads; {rounds} rounds x {steps} steps",
          flush=True)
    clock = C.CLOCKS[args.clock]
    contenders = {"whole graph": functrain_contender(copy.deepcopy(base), batches, steps, clock, leafwise=False),
                  "split": functrain_contender(copy.deepcopy(base), batches, steps, clock, leafwise=True),
                  "hand loop": hand_contender(copy.deepcopy(base), batches, steps, clock)}
    for one, _ in contenders.values():
        one(), one()  # compile
    results = C.interleave({name: run for name, (_, run) in contenders.items()}, rounds)
    loads = results.pop("_loadavg")
    print(C.table(results, "hand loop"))
    hand = results["hand loop"]["median_ms"]
    summary = {name: results[name]["median_ms"] / hand for name in ("whole graph", "split")}
    print(f"vs the compiled hand loop: whole graph {summary['whole graph']:.3f}x, split {summary['split']:.3f}x")
    report = {"quick": args.quick, "config": cfg, "threads": args.threads, "clock": args.clock, "steps_per_round": steps,
              "rounds": rounds, "results": results, "loadavg_per_round": loads, "vs_hand_loop": summary}
    if not args.quick or args.out:
        C.write_report("compiled_update", report, args.out)
    return report


if __name__ == "__main__":
    main()
