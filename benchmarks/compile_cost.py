"""Compile cost (target 5): time to the first finished step, cold and with a warm compile cache.

    python benchmarks/compile_cost.py
    python benchmarks/compile_cost.py --quick

Each round makes a fresh temporary ``TORCHINDUCTOR_CACHE_DIR`` and runs two processes over it,
with inductor's FX graph cache and AOTAutograd cache on: the first (cold) compiles from
scratch and fills the cache, the second (warm) starts from the filled cache (dynamo still traces
the Python in every process; only the compiled artifacts are reused). Each process times
``make_train_step(compile=True, donate=True)`` on the train_step.py GPT-2 (4 layers, width 256)
up to the first finished step, excluding imports and model construction (reported apart).

Target: warm <= 30% of cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

try:
    from . import _common as C
except ImportError:
    import _common as C

CACHE_ENV = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def child(quick: bool) -> dict:
    t_start = time.perf_counter()
    import torch

    import functrain as ft
    from functrain.step.train import make_train_step

    try:
        from .train_step import config
    except ImportError:
        from train_step import config
    t_import = time.perf_counter()
    cfg = config(quick)
    model = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    batch = C.lm_batches(1, cfg["batch"], cfg["seq"], cfg["vocab"])[0]
    tx = ft.optim.adamw(ft.schedules.linear(3e-4, 0, 1000), weight_decay=0.0)
    state = ft.TrainState.create(model, tx, seed=0)
    t_model = time.perf_counter()
    step = make_train_step(model, tx, compile=True, donate=True, max_grad_norm=1.0)
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])  # the step is finished when its result can be read
    t_first = time.perf_counter()
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    float(metrics["loss"])
    second = time.perf_counter() - t0
    return {"import_s": t_import - t_start, "model_s": t_model - t_import, "first_step_s": t_first - t_model,
            "second_step_s": second, "loss": loss, "torch": torch.__version__}


def run_child(cache_dir: str, quick: bool) -> dict:
    env = {**os.environ, **CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    cmd = [sys.executable, __file__, "--child"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=C.ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compile child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="cold/warm pairs, each with a fresh cache dir")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.quick)), flush=True)
        return {}
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"compile cost: {rounds} cold/warm pairs, FX graph + AOTAutograd caches on", flush=True)
    cold, warm, loads = [], [], []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
            cold.append(run_child(cache, args.quick))
            warm.append(run_child(cache, args.quick))
        loads.append(list(os.getloadavg()))
        print(f"  round {r + 1}: cold {cold[-1]['first_step_s']:.1f} s, warm {warm[-1]['first_step_s']:.1f} s "
              f"(load {loads[-1][0]:.2f})", flush=True)
    results = {}
    for name, runs in (("cold", cold), ("warm", warm)):
        results[name] = {k: statistics.median(x[k] for x in runs)
                         for k in ("first_step_s", "second_step_s", "import_s", "model_s", "process_wall_s")}
        results[name]["runs"] = runs
    ratio = results["warm"]["first_step_s"] / results["cold"]["first_step_s"]
    print(f"{'':<6} {'first step s':>13} {'import s':>9} {'process s':>10}")
    for name, r in results.items():
        print(f"{name:<6} {r['first_step_s']:>13.2f} {r['import_s']:>9.2f} {r['process_wall_s']:>10.2f}")
    print(f"warm / cold time to first step = {ratio:.3f} (target <= 0.30)")
    report = {"quick": args.quick, "rounds": rounds, "cache_env": CACHE_ENV, "results": results,
              "loadavg_per_round": loads, "summary": {"warm_vs_cold": ratio, "target": 0.30}}
    C.write_report("compile_cost", report, args.out)
    return report


if __name__ == "__main__":
    main()
