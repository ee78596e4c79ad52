"""Compile options for the overhead-bound step, one worker process per variant, interleaved.

    python benchmarks/step_variants.py --threads 1                     # every variant
    python benchmarks/step_variants.py --threads 1 flat flat_no_guards  # a subset (hand always runs)

The 64-layer MLP of ``overhead_step.py``. Variants of one compiled step can share neither a
process nor dynamo's cache (a second ``torch.compile`` of the same code with other options finds
the first one's graph and runs it), so each variant lives in its own process; the parent asks each
in turn for a round of steps (A B C A B C ...), one process running at a time. After the rounds it
compares every variant's params with the hand loop's (same init, same batches, same step count).
Results: ``benchmarks/results/step_variants.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

try:
    from . import _common as C
except ImportError:
    import _common as C


def _no_guards(entries):
    return [False] * len(entries)


def _no_parameter_guards(entries):
    import torch

    return [not isinstance(e.value, torch.nn.Parameter) for e in entries]


# name -> make_train_step keyword arguments ("hand": the eager hand loop of overhead_step.py)
VARIANTS = {
    "hand": None,
    "per_tensor": dict(flat=False),
    "flat": dict(flat=True),
    "flat_no_guards": dict(flat=True, compile_kwargs={"options": {"guard_filter_fn": _no_guards}}),
    "flat_no_parameter_guards": dict(flat=True, compile_kwargs={"options": {"guard_filter_fn": _no_parameter_guards}}),
    "flat_combo_kernels": dict(flat=True, compile_kwargs={"options": {"combo_kernels": True}}),
}


def _worker(name: str, threads: int, quick: bool, conn) -> None:
    import torch

    torch.set_num_threads(threads)
    import functrain as ft
    from functrain.step.train import make_train_step

    try:
        from . import overhead_step as O
    except ImportError:
        import overhead_step as O
    cfg = O.config(quick)
    model = O.mlp(cfg["layers"], cfg["width"])
    batches = O.make_batches(8, cfg["batch"], cfg["width"])
    kwargs = VARIANTS[name]
    if kwargs is None:
        one, _ = O.hand_contender(model, batches, 1)
        params = lambda: dict(model.named_parameters())  # noqa: E731
    else:
        kwargs = {**kwargs, "compile_kwargs": {k: dict(v) for k, v in kwargs.get("compile_kwargs", {}).items()}}
        tx = ft.optim.adamw(O.LR, weight_decay=0.0)
        step = make_train_step(model, tx, O.mse_loss, compile=True, donate=True, max_grad_norm=1.0, **kwargs)
        state = ft.TrainState.create(model, tx, seed=0, copy=True)
        box = [ft.flat.flatten_state(state, tx) if kwargs["flat"] else state, 0]

        def one():
            box[0], _ = step(box[0], batches[box[1] % len(batches)])
            box[1] += 1

        params = lambda: box[0].params  # noqa: E731
    t0 = time.perf_counter()
    for _ in range(3):
        one()
    conn.send(time.perf_counter() - t0)
    while (steps := conn.recv()) is not None:
        conn.send(C.timed_steps(one, steps))
    conn.send({k: v.detach().numpy().copy() for k, v in params().items()})  # numpy: pickles by value


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", help=f"any of {list(VARIANTS)} (default: all)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; expected some of {list(VARIANTS)}")
    names = ["hand"] + [n for n in (args.variants or VARIANTS) if n != "hand"]
    steps, rounds = args.steps or (3 if args.quick else 20), args.rounds or (2 if args.quick else 7)
    ctx = mp.get_context("spawn")
    workers, warmup_s = {}, {}
    for name in names:  # set up (compile) one at a time
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, args.threads, args.quick, child))
        proc.start()
        warmup_s[name] = parent.recv()
        print(f"  {name}: set up and warmed in {warmup_s[name]:.1f} s", flush=True)
        workers[name] = (proc, parent)

    def round_of(conn):
        def run():
            conn.send(steps)
            return conn.recv()
        return run

    results = C.interleave({n: round_of(conn) for n, (_, conn) in workers.items()}, rounds)
    loads = results.pop("_loadavg")
    params = {}
    for name, (proc, conn) in workers.items():
        conn.send(None)
        params[name] = conn.recv()
        proc.join()
    for name in names:
        results[name]["max_abs_param_diff_vs_hand"] = max(float(abs(params[name][k] - params["hand"][k]).max())
                                                          for k in params[name])
    print(C.table(results, "hand"))
    report = {"quick": args.quick, "threads": args.threads, "steps_per_round": steps, "rounds": rounds,
              "setup_and_warmup_s": warmup_s, "results": results, "loadavg_per_round": loads}
    C.write_report("step_variants", report, args.out)
    return report


if __name__ == "__main__":
    main()
