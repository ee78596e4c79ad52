"""Where the eager Trainer step's time goes: bare steps on the ``trainer_step.py`` model, same run.

    python benchmarks/eager_step_paths.py                # GPT-2 4 layers d256, 1 thread, 14 rounds
    python benchmarks/eager_step_paths.py --clock cpu    # process CPU time (a machine loaded by others)
    python benchmarks/eager_step_paths.py --quick        # tiny model (smoke test)

Contenders, interleaved step by step (medians, first two rounds dropped, load recorded):

* ``hand loop``: what HF's Trainer runs per step: ``loss.backward()``, ``clip_grad_norm_(1.0)``,
  ``AdamW(fused=True)``, ``LambdaLR``, ``zero_grad``.
* ``functrain (Trainer's step)``: ``make_train_step`` as the Trainer builds it by default (donated,
  leafwise, ``skip_non_finite``, clip 1.0): AdamW through torch's fused kernel.
* ``chain, grouped``: the same step with the ``adamw`` chain run a group of tensors at a time (the
  path before the fused kernel; the tx wrapped in ``chain`` so the step does not recognize it).
* ``chain, grouped, no skip``: the same without the non-finite guard.
* ``flat``: ``flat=True`` (params and moments in contiguous segments; the chain over segments).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

LR, TOTAL = 3e-4, 10_000


def functrain_step(base, batches, clock, *, fused=True, skip=True, flat=False):
    import functrain as ft
    from functrain.step.train import make_train_step

    model = copy.deepcopy(base)
    tx = ft.optim.adamw(ft.schedules.linear(LR, 0, TOTAL), weight_decay=0.0)
    if not fused:
        tx = ft.optim.chain(tx)  # the same update; hides the plain-adamw marker from the step
    step = make_train_step(model, tx, donate=True, leafwise_update=True, max_grad_norm=1.0, skip_non_finite=skip,
                           flat=flat)
    box = [ft.TrainState.create(model, tx), 0]

    def one():
        batch = batches[box[1] % len(batches)]
        box[1] += 1
        t = clock()
        box[0], _ = step(box[0], batch)
        return clock() - t

    return one


def hand_loop(base, batches, clock):
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.linear_lambda(0, TOTAL))
    box = [0]

    def one():
        batch = batches[box[0] % len(batches)]
        box[0] += 1
        t = clock()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t

    return one


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    cfg = (dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=4) if args.quick
           else dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, seq=128, batch=8))
    rounds = args.rounds or (4 if args.quick else 14)
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    batches = C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"])
    contenders = {
        "hand loop": hand_loop(base, batches, clock),
        "functrain (Trainer's step)": functrain_step(base, batches, clock),
        "chain, grouped": functrain_step(base, batches, clock, fused=False),
        "chain, grouped, no skip": functrain_step(base, batches, clock, fused=False, skip=False),
        "flat": functrain_step(base, batches, clock, flat=True),
    }
    load_before = os.getloadavg()
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, one in contenders.items():
            times[name].append(one())
    med = {k: 1e3 * statistics.median(v[2:]) for k, v in times.items()}
    ref = med["hand loop"]
    report = {"quick": args.quick, "config": cfg, "rounds": rounds, "threads": args.threads, "clock": args.clock,
              "median_ms": med, "ratio_to_hand_loop": {k: v / ref for k, v in med.items()},
              "loadavg_before": list(load_before)}
    for k, v in med.items():
        print(f"{k:28s} {v:8.1f} ms  {v / ref:.3f}x")
    C.write_report("eager_step_paths", report, args.out or str(C.RESULTS / "eager_step_paths.json"))
    return report


if __name__ == "__main__":
    main()
