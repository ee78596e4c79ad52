"""Runner overhead: a ``functrain.run`` step minus a bare loop of the same step, in µs.

    python benchmarks/runner_overhead.py
    python benchmarks/runner_overhead.py --quick

The step is :func:`functrain.make_train_step` (compiled, AdamW, clip 1.0) on the small MLP of
``driver_overhead.py``; the data come from a :class:`functrain.data.ResumableLoader` over rows
(fetch + collate: data loading included) for every contender. Contenders, interleaved in rounds
of ``block`` steps under the same load (``_common.interleave``):

- ``bare step``: the step alone on already-collated batches (what ``driver_overhead.py`` subtracts
  from the Trainer, so ``run() - bare step`` compares with the Trainer's figure);
- ``bare loop``: ``for batch in loader: state, _ = step(state, batch)``, timed per iteration;
- ``run()``: ``functrain.run(step, state, loader, steps=block, hooks=[...])`` with a Log hook
  whose period is longer than the block (so no step reads a metric, as in the bare loop), a
  Jsonl writer, and a timing hook recording the time between consecutive steps;
- ``run() + Checkpoint``: the same with a Checkpoint hook that does not fire within the block.

Per-step overhead = difference of medians. Then ``driver_overhead.py`` runs in the same process
for the Trainer's overhead over the bare step under the same load.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

try:
    from . import _common as C
    from . import driver_overhead as D
except ImportError:
    import _common as C
    import driver_overhead as D


def main(argv=None) -> dict:
    import functrain as ft
    from functrain.data.loader import ResumableLoader
    from functrain.runner import Checkpoint, Hook, Jsonl, Log

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = D.config(args.quick)
    block, rounds = (8, 2) if args.quick else (20, args.rounds or 24)
    torch.manual_seed(0)
    model = D.MLPRegressor(cfg["width"], cfg["layers"])
    rows = D.make_rows(cfg["batch"] * 64, cfg["width"])
    tx = ft.optim.adamw(ft.schedules.linear(1e-3, 0, 10_000), weight_decay=0.0)
    step = ft.make_train_step(copy.deepcopy(model), tx, compile=True, max_grad_norm=1.0)
    shared = {"state": ft.TrainState.create(model, tx, seed=0, copy=True)}
    loader = ResumableLoader(rows, cfg["batch"], seed=0)
    out_dir = tempfile.mkdtemp(prefix="runner_bench_")
    for batch in loader:  # compile once, outside the measurement
        shared["state"], _ = step(shared["state"], batch)
        break

    collated = [b for _, b in zip(range(block), ResumableLoader(rows, cfg["batch"], seed=0))]

    def bare_step() -> list[float]:
        times = []
        for batch in collated:
            t0 = time.perf_counter()
            shared["state"], _ = step(shared["state"], batch)
            times.append(time.perf_counter() - t0)
        return times

    def bare() -> list[float]:
        times, t0 = [], time.perf_counter()
        for batch in loader:
            shared["state"], _ = step(shared["state"], batch)
            t = time.perf_counter()
            times.append(t - t0)
            t0 = t
            if len(times) == block:
                break
        return times

    class Timer(Hook):
        def on_start(self, run):
            self.times, self.t0 = [], time.perf_counter()

        def on_step(self, run):
            t = time.perf_counter()
            self.times.append(t - self.t0)
            self.t0 = t

    def with_runner(extra) -> callable:
        def go() -> list[float]:
            timer = Timer()
            hooks = [Log(every=10**9), Jsonl(os.path.join(out_dir, "metrics.jsonl")), *extra(), timer]
            r = ft.run(step, shared["state"], loader, steps=block, hooks=hooks)
            shared["state"] = r.state
            return timer.times

        return go

    contenders = {
        "bare step": bare_step,
        "bare loop": bare,
        "run()": with_runner(lambda: []),
        "run() + Checkpoint": with_runner(lambda: [Checkpoint(os.path.join(out_dir, "ck"), every=10**9,
                                                              resume=False)]),
    }
    print(f"runner overhead: MLP {cfg}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{rounds} rounds x {block} steps", flush=True)
    results = C.interleave(contenders, rounds)
    loads = results.pop("_loadavg")
    print(C.table(results, "bare loop"))
    bare_ms = results["bare loop"]["median_ms"]
    summary = {name: (r["median_ms"] - bare_ms) * 1e3 for name, r in results.items() if name.startswith("run")}
    for name, us in summary.items():
        print(f"{name} overhead per step over the bare loop: {us:.0f} us (difference of medians)")
    step_ms = results["bare step"]["median_ms"]
    vs_step = {name: (r["median_ms"] - step_ms) * 1e3 for name, r in results.items() if name != "bare step"}
    for name, us in vs_step.items():
        print(f"{name} minus the bare step (data loading included): {us:.0f} us")
    report = {"quick": args.quick, "config": cfg, "block": block, "rounds": rounds, "results": results,
              "loadavg_per_round": loads, "summary": {"runner_overhead_us": summary, "over_bare_step_us": vs_step}}
    if not args.skip_trainer:
        # Its own report goes to a temporary file: benchmarks/results/driver_overhead.json is its own run's.
        trainer = D.main((["--quick"] if args.quick else []) + ["--out", os.path.join(out_dir, "driver_overhead.json")])
        report["trainer"] = trainer["summary"]
        print(f"Trainer overhead per step (same process, driver_overhead.py): {trainer['summary']['overhead_us']:.0f} us")
    C.write_report("runner_overhead", report, args.out)
    return report


if __name__ == "__main__":
    main()
