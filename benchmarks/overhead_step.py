"""Overhead-bound step (target 3): a 64-layer, width-128 MLP at batch 32, where Python and kernel
launch overhead, not FLOPs, set the step time.

    python benchmarks/overhead_step.py
    python benchmarks/overhead_step.py --quick

Contenders (same init, same batches, MSE loss, AdamW, clip 1.0):

* ``functrain``: ``make_train_step(compile=True, donate=True, leafwise_update=True, max_grad_norm=1.0)``.
* ``functrain flat``: the same with ``flat=True`` (params, moments and gradients in one flat
  segment: the update, the norm and the clipping are one kernel each, not 128).
* ``functrain flat whole graph``: flat, ``leafwise_update=False``: the update compiled into the
  step's graph, its new segments written back after it.
* ``functrain pure``: the same, ``donate=False`` (fresh params and moments each step).
* ``hand loop``: eager ``backward``, ``clip_grad_norm_``, ``AdamW(fused=True)``.

Target: functrain <= 0.7x the hand loop.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

try:
    from . import _common as C
except ImportError:
    import _common as C

LR = 1e-3


def config(quick: bool) -> dict:
    return dict(layers=4, width=16, batch=8) if quick else dict(layers=64, width=128, batch=32)


def mlp(layers: int, width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def mse_loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def make_batches(n: int, batch: int, width: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, width, generator=g), "y": torch.randn(batch, width, generator=g)}
            for _ in range(n)]


def functrain_contender(model, batches, steps, donate: bool, flat: bool = False, leafwise: bool = True):
    import functrain as ft
    from functrain.step.train import make_train_step

    tx = ft.optim.adamw(LR, weight_decay=0.0)
    # leafwise (the Trainer's setting for AdamW): donated, the gradients are compiled and the update
    # runs in place after the graph (torch's fused AdamW; flat: one kernel per segment); without
    # it the whole step is one graph whose new params and moments are written back after it.
    step = make_train_step(model, tx, mse_loss, compile=True, donate=donate, max_grad_norm=1.0, flat=flat,
                           leafwise_update=leafwise and donate)
    state = ft.TrainState.create(model, tx, seed=0, copy=True)
    box = [ft.flat.flatten_state(state, tx) if flat else state, 0]

    def one():
        box[0], _ = step(box[0], batches[box[1] % len(batches)])
        box[1] += 1

    return one, lambda: C.timed_steps(one, steps)


def hand_contender(model, batches, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    box = [0]

    def one():
        batch = batches[box[0] % len(batches)]
        box[0] += 1
        loss = mse_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one, lambda: C.timed_steps(one, steps)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="contender names to run (the hand loop always runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 30)
    rounds = args.rounds or (2 if args.quick else 7)
    cfg = config(args.quick)
    base = mlp(cfg["layers"], cfg["width"])
    batches = make_batches(8, cfg["batch"], cfg["width"])
    print(f"overhead step: MLP {cfg}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{rounds} rounds x {steps} steps", flush=True)
    contenders, compile_s = {}, {}
    for name, make in (("functrain", lambda m: functrain_contender(m, batches, steps, True)),
                       ("functrain flat", lambda m: functrain_contender(m, batches, steps, True, flat=True)),
                       ("functrain flat whole graph",
                        lambda m: functrain_contender(m, batches, steps, True, flat=True, leafwise=False)),
                       ("functrain pure", lambda m: functrain_contender(m, batches, steps, False)),
                       ("hand loop", lambda m: hand_contender(m, batches, steps))):
        if args.only and name not in args.only and name != "hand loop":
            continue
        t0 = time.perf_counter()
        one, run = make(copy.deepcopy(base))
        for _ in range(3):
            one()
        compile_s[name] = time.perf_counter() - t0
        contenders[name] = run
    results = C.interleave(contenders, rounds)
    loads = results.pop("_loadavg")
    print(C.table(results, "hand loop"))
    hand = results["hand loop"]["median_ms"]
    ratio, flat_ratio = (results[k]["median_ms"] / hand if k in results else None for k in ("functrain", "functrain flat"))
    print(f"functrain / hand loop = {ratio}, functrain flat / hand loop = {flat_ratio} (target <= 0.7)")
    report = {"quick": args.quick, "config": cfg, "steps_per_round": steps, "rounds": rounds,
              "setup_and_warmup_s": compile_s, "results": results, "loadavg_per_round": loads,
              "summary": {"functrain_vs_hand": ratio, "functrain_flat_vs_hand": flat_ratio, "target_vs_hand": 0.7}}
    C.write_report("overhead_step", report, args.out)
    return report


if __name__ == "__main__":
    main()
