"""Loop overhead in CPU microseconds per step: a bare loop, ``functrain.run``, ``Trainer.train()``.

    python benchmarks/loop_overhead.py [--rounds 5] [--steps 60] [--out file.json]
    python benchmarks/loop_overhead.py --quick

The same compiled step (``make_train_step``: the MLP of ``driver_overhead.py``, AdamW, clip 1.0,
donating, one intra-op thread) over the same :class:`functrain.data.ResumableLoader` (fetch +
collate: data loading included) is driven three ways, in rounds (A B C A B C ...):

- ``bare loop``: ``for batch in loader: state, _ = step(state, batch)``;
- ``run()``: ``functrain.run`` with ``Log`` (period longer than the block: no host read), ``Jsonl``;
- ``Trainer``: one ``Trainer.train()`` (``torch_compile=True``, no logging/saving/eval), timed from
  one ``on_step_begin`` to the next: everything one loop iteration costs. Its callback runs the
  other two contenders' blocks every ``steps`` steps (outside the Trainer's clock).

Each step is timed with the main thread's CPU clock (``time.thread_time``) as well as the wall
clock: on a shared, loaded machine wall time mostly measures the neighbours, CPU time what the
loop itself spends. Medians over all rounds (the first ``warmup`` steps of each block dropped).
To compare two versions of the Trainer, run this file with each checkout on ``sys.path`` (e.g.
a ``git worktree`` of the older commit), alternating, and compare ``Trainer - bare loop``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

try:
    from . import _common as C
    from . import driver_overhead as D
except ImportError:
    import _common as C
    import driver_overhead as D


def _clocks():
    return time.perf_counter(), time.thread_time()


def _record(times: dict, t0) -> tuple:
    t1 = _clocks()
    times["wall"].append(t1[0] - t0[0])
    times["cpu"].append(t1[1] - t0[1])
    return t1


def main(argv=None) -> dict:
    import functrain as ft
    from functrain import Trainer, TrainerCallback, TrainingArguments
    from functrain.data.collators import default_data_collator
    from functrain.data.loader import ResumableLoader
    from functrain.runner import Hook, Jsonl, Log

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="steps per contender per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round of 6 steps (a smoke run)")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.steps, opts.warmup = 1, 6, 1
    torch.set_num_threads(1)
    cfg = D.config(False)
    torch.manual_seed(0)
    model = D.MLPRegressor(cfg["width"], cfg["layers"])
    rows = D.make_rows(cfg["batch"] * 64, cfg["width"])
    tx = ft.optim.adamw(ft.schedules.linear(1e-3, 0, 10**6), weight_decay=0.0)
    step = ft.make_train_step(copy.deepcopy(model), tx, compile=True, max_grad_norm=1.0, donate=True)
    shared = {"state": ft.TrainState.create(model, tx, seed=0, copy=True)}
    loader = ResumableLoader(rows, cfg["batch"], seed=0)
    out_dir = tempfile.mkdtemp(prefix="loop_bench_")
    n, w = opts.steps, opts.warmup

    def bare() -> dict:
        times = {"wall": [], "cpu": []}
        t = _clocks()
        for i, batch in zip(range(n), _forever(loader)):
            shared["state"], _ = step(shared["state"], batch)
            t = _record(times, t)
        return times

    class Timer(Hook):
        def on_start(self, run):
            self.times, self.t = {"wall": [], "cpu": []}, _clocks()

        def on_step(self, run):
            self.t = _record(self.times, self.t)

    def runner() -> dict:
        timer = Timer()
        r = ft.run(step, shared["state"], loader, steps=n,
                   hooks=[Log(every=10**9), Jsonl(os.path.join(out_dir, "metrics.jsonl")), timer])
        shared["state"] = r.state
        return timer.times

    samples = {name: {"wall": [], "cpu": []} for name in ("bare loop", "run()", "Trainer")}
    loads = []

    def add(name, got):
        for clock in ("wall", "cpu"):
            samples[name][clock] += got[clock][w:]

    class Interleave(TrainerCallback):
        """Times the Trainer from one on_step_begin to the next; every ``n`` steps, runs a block of
        the bare loop and one of run() in between (outside the Trainer's clock): one round."""

        def __init__(self):
            self.times, self.t = {"wall": [], "cpu": []}, None

        def on_step_begin(self, args, state, control, **kw):
            if self.t is not None:
                _record(self.times, self.t)
            if state.global_step % n == 0:
                if state.global_step > n:  # the first block is warm-up (compilation)
                    add("Trainer", self.times)
                    add("bare loop", bare())
                    add("run()", runner())
                    loads.append(list(os.getloadavg()))
                    print(f"  round {len(loads)}/{opts.rounds}: load {loads[-1][0]:.1f}; " + ", ".join(
                        f"{k} {statistics.median(v['cpu']) * 1e6:.0f} us cpu" for k, v in samples.items()),
                        flush=True)
                else:
                    bare(), runner()  # compile once, outside the measurement
                self.times = {"wall": [], "cpu": []}
            self.t = _clocks()

    print(f"loop overhead: MLP {cfg}, torch {torch.__version__}, 1 thread, {opts.rounds} rounds x {n} steps; "
          f"functrain from {os.path.dirname(ft.__file__)}", flush=True)
    targs = TrainingArguments(out_dir, per_device_train_batch_size=cfg["batch"], max_steps=n * (opts.rounds + 1) + 1,
                              learning_rate=1e-3, logging_steps=10**6, save_strategy="no", torch_compile=True,
                              disable_tqdm=True, report_to="none", seed=0)
    Trainer(model=copy.deepcopy(model), args=targs, train_dataset=C.ListDataset([default_data_collator(rows[i:i + 8]) for i in range(0, len(rows), 8)]), callbacks=[Interleave()]).train()
    import functrain.trainer.trainer as trainer_module

    med = {name: {clock: statistics.median(v) * 1e6 for clock, v in s.items()} for name, s in samples.items()}
    over = {name: {clock: med[name][clock] - med["bare loop"][clock] for clock in ("wall", "cpu")}
            for name in ("run()", "Trainer")}
    print(f"{'contender':<12}{'cpu us/step':>14}{'wall us/step':>14}")
    for name, m in med.items():
        print(f"{name:<12}{m['cpu']:>14.0f}{m['wall']:>14.0f}")
    for name, o in over.items():
        print(f"{name} over the bare loop: {o['cpu']:.0f} us cpu, {o['wall']:.0f} us wall (difference of medians)")
    report = {"quick": opts.quick, "config": cfg, "rounds": opts.rounds, "steps": n, "warmup_dropped": w, "loadavg_per_round": loads,
              "functrain": os.path.dirname(ft.__file__), "trainer_has_runner": hasattr(trainer_module, "run"),
              "median_us": med, "overhead_over_bare_loop_us": over}
    C.write_report("loop_overhead", report, opts.out)
    return report


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
