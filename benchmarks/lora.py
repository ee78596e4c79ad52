"""LoRA (peft) training: peak memory against transformers.Trainer, and a population of adapters.

    python benchmarks/lora.py                 # both sections
    python benchmarks/lora.py --quick         # tiny sizes (a smoke run)
    python benchmarks/lora.py --only memory   # or: --only population

memory: a GPT-2 (~49M parameters) wrapped by ``peft.get_peft_model(LoraConfig(r=8,
target_modules=["c_attn"], fan_in_fan_out=True))``, trained for a few steps by
``transformers.Trainer`` and by ``functrain.Trainer`` with the same arguments, each in its own
process (interleaved, ``--rounds`` each). Figures from ``/proc/self/status``: ``peak_rss_mb``
(``VmHWM``, the whole process: imports, model, Trainer, training) and ``baseline_rss_mb`` (after
the PeftModel is built). Target: functrain's peak <= 1.1x transformers'.

population: 4 LoRA adapters over ONE frozen tiny GPT-2, each with its own data, learning rate and
seed: one vmapped population step (``make_population_train_step(..., buffers="shared")``)
against the 4 ordinary steps it replaces, run one after another; eager, interleaved, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

MEMORY_VARIANTS = ("transformers.Trainer", "functrain.Trainer")


def memory_config(quick: bool) -> dict:
    if quick:
        return dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=2, r=4)
    return dict(n_layer=6, n_embd=768, n_head=12, vocab=8192, seq=128, batch=4, r=8)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lora_gpt2(cfg: dict, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"], seed=seed)
    return get_peft_model(base, LoraConfig(r=cfg["r"], target_modules=["c_attn"], fan_in_fan_out=True))


def memory_child(variant: str, quick: bool, steps: int, out_dir: str) -> dict:
    cfg = memory_config(quick)
    model = lora_gpt2(cfg)
    data = C.ListDataset(C.lm_batches(2, cfg["batch"], cfg["seq"], cfg["vocab"]))
    baseline = _status_mb("VmRSS")
    common = dict(per_device_train_batch_size=cfg["batch"], max_steps=steps, learning_rate=1e-4, save_strategy="no",
                  logging_steps=steps, disable_tqdm=True, seed=0)
    t0 = time.perf_counter()
    if variant == "transformers.Trainer":
        import transformers

        args = transformers.TrainingArguments(out_dir, report_to="none", use_cpu=not torch.cuda.is_available(),
                                              **common)
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    else:
        import functrain as ft

        ft.Trainer(model=model, args=ft.TrainingArguments(out_dir, report_to=[], **common), train_dataset=data).train()
    return {"variant": variant, "baseline_rss_mb": baseline, "peak_rss_mb": _status_mb("VmHWM"),
            "train_s": time.perf_counter() - t0,
            "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "adapter_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_memory_child(variant: str, quick: bool, steps: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(steps), "--child-out", out_dir] + (
            ["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(quick: bool, steps: int, rounds: int) -> dict:
    print(f"memory: LoRA on GPT-2 {memory_config(quick)}, one process per run, {rounds} rounds", flush=True)
    runs = {v: [] for v in MEMORY_VARIANTS}
    loads = []
    for r in range(rounds):
        for v in MEMORY_VARIANTS:
            runs[v].append(run_memory_child(v, quick, steps))
            loads.append(list(os.getloadavg()))
            print(f"  round {r + 1}: {v}: peak {runs[v][-1]['peak_rss_mb']:.0f} MB "
                  f"(baseline {runs[v][-1]['baseline_rss_mb']:.0f} MB); load {loads[-1][0]:.2f}", flush=True)
    results = {v: {k: statistics.median(x[k] for x in rs) for k in ("baseline_rss_mb", "peak_rss_mb", "train_s")}
               | {"runs": rs} for v, rs in runs.items()}
    ref, ours = results["transformers.Trainer"], results["functrain.Trainer"]
    ratio = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    growth = (ours["peak_rss_mb"] - ours["baseline_rss_mb"]) / max(ref["peak_rss_mb"] - ref["baseline_rss_mb"], 1e-9)
    print(f"functrain.Trainer peak RSS {ours['peak_rss_mb']:.0f} MB vs transformers.Trainer "
          f"{ref['peak_rss_mb']:.0f} MB: {ratio:.3f}x (target <= 1.1x); growth over baseline {growth:.3f}x")
    return {"config": memory_config(quick), "steps": steps, "rounds": rounds, "results": results,
            "loadavg_per_run": loads, "peak_ratio_vs_transformers": ratio, "growth_ratio_vs_transformers": growth,
            "target": 1.1}


def population(quick: bool, steps: int, rounds: int) -> dict:
    import functrain as ft
    from functrain.trainer import adapter_population
    from functrain.step import population as P

    cfg = (dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=4, r=4) if quick
           else dict(n_layer=2, n_embd=128, n_head=4, vocab=512, seq=64, batch=8, r=8))
    n = 4
    model = lora_gpt2(cfg)
    txf = ft.optim.inject_hyperparams(ft.optim.adamw)
    hps = [dict(learning_rate=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    state, tx = adapter_population.create_adapter_population(model, txf, hps, seeds=list(range(n)))
    members = P.unstack_state(state, buffers="shared")
    members = [m.replace(params={k: v.clone() for k, v in m.params.items()},
                         opt_state=ft.tree.map(lambda x: x.clone(), m.opt_state)) for m in members]
    batches = C.lm_batches(n * 2, cfg["batch"], cfg["seq"], cfg["vocab"], seed=1)
    stacked = [{k: torch.stack([batches[2 * i + j][k] for i in range(n)]) for k in batches[0]} for j in range(2)]
    pop_step = P.make_population_train_step(model, tx, in_dims="per_member", buffers="shared")
    member_steps = [ft.make_train_step(model, txf(**hp)) for hp in hps]
    box = {"pop": state, "members": members}

    def run_population():
        out = []
        for i in range(steps):
            t0 = time.perf_counter()
            box["pop"], _ = pop_step(box["pop"], stacked[i % 2])
            out.append(time.perf_counter() - t0)
        return out

    def run_sequential():
        out = []
        for i in range(steps):
            t0 = time.perf_counter()
            for m in range(n):
                box["members"][m], _ = member_steps[m](box["members"][m], {k: v[m] for k, v in stacked[i % 2].items()})
            out.append(time.perf_counter() - t0)
        return out

    run_population(), run_sequential()  # warm-up
    print(f"population: {n} LoRA adapters on GPT-2 {cfg}, {rounds} rounds x {steps} steps", flush=True)
    results = C.interleave({"4 sequential steps": run_sequential, "population step": run_population}, rounds)
    print(C.table(results, "4 sequential steps"))
    speedup = results["4 sequential steps"]["median_ms"] / results["population step"]["median_ms"]
    print(f"population is {speedup:.2f}x faster than 4 steps one after another")
    return {"config": cfg, "members": n, "steps": steps, "rounds": rounds, "results": results,
            "speedup_vs_sequential": speedup}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("memory", "population"), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        C.quiet_transformers()
        print(json.dumps(memory_child(args.child, args.quick, args.steps, args.child_out)), flush=True)
        return {}
    report = {"quick": args.quick}
    if args.only in (None, "memory"):
        report["memory"] = memory(args.quick, args.steps or 4, args.rounds or (1 if args.quick else 2))
    if args.only in (None, "population"):
        report["population"] = population(args.quick, args.steps or 3, args.rounds or (1 if args.quick else 5))
    C.write_report("lora", report, args.out)
    return report


if __name__ == "__main__":
    main()
