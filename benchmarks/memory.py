"""Peak memory of training a ~50M-parameter GPT-2 (target 4), each variant in its own process.

    python benchmarks/memory.py
    python benchmarks/memory.py --quick

Variants (same model, same batches, AdamW, clip 1.0):

* ``hand loop``: eager ``backward``, ``clip_grad_norm_``, ``AdamW(fused=True)``.
* ``functrain donated``: ``make_train_step(compile=True, donate=True)``.
* ``functrain pure``: ``make_train_step(compile=True, donate=False)`` (new params and moments
  each step; the old state stays valid).
* ``functrain donated eager``: ``donate=True`` without compile.

Figures per process (Linux ``/proc/self/status``):

* ``peak_rss_mb``: the process's peak RSS (``VmHWM``) over its whole life, compile included;
* ``train_peak_rss_mb``: the peak RSS over the timed steps only, after warm-up/compile (the peak
  is reset by writing ``5`` to ``/proc/self/clear_refs``): the steady-state cost of training;
* ``baseline_rss_mb``: RSS after the model is built, before any optimizer state exists;
* on CUDA, ``cuda_max_allocated_mb`` over the timed steps.

Target: functrain donated <= 1.05x the hand loop (train peak). Processes run interleaved
(A B C D A B C D ...) and each figure is the median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

VARIANTS = ("hand loop", "functrain donated", "functrain pure", "functrain donated eager")


def config(quick: bool) -> dict:
    if quick:
        return dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=2)
    # 6 x 12 x 768^2 + 8192 x 768 + 128 x 768 ~= 49M parameters (tied embedding)
    return dict(n_layer=6, n_embd=768, n_head=12, vocab=8192, seq=128, batch=4)


def child(variant: str, quick: bool, steps: int) -> dict:
    """Run one variant in this process; return its memory figures."""
    cfg = config(quick)
    model = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in C.lm_batches(2, cfg["batch"], cfg["seq"], cfg["vocab"])]
    baseline = C.status_mb("VmRSS")
    if variant == "hand loop":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

        def one(i):
            loss = model(**batches[i % 2], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import functrain as ft
        from functrain.step.train import make_train_step

        tx = ft.optim.adamw(1e-4, weight_decay=0.0)
        step = make_train_step(model, tx, compile=variant != "functrain donated eager",
                               donate=variant != "functrain pure", max_grad_norm=1.0)
        box = [ft.TrainState.create(model, tx, seed=0)]

        def one(i):
            box[0], _ = step(box[0], batches[i % 2])

    one(0)
    one(1)  # compiled, every buffer allocated once
    peak_with_compile = C.status_mb("VmHWM")
    C.reset_peak_rss()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        one(i)
    out = {"variant": variant, "params": sum(p.numel() for p in model.parameters()), "baseline_rss_mb": baseline,
           "train_peak_rss_mb": C.status_mb("VmHWM"), "peak_rss_mb": max(peak_with_compile, C.status_mb("VmHWM"))}
    if device == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(variant: str, quick: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(steps)] + (["--quick"] if quick else [])
    return C.run_json_child(cmd, mmap=False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per process")
    ap.add_argument("--rounds", type=int, default=None, help="processes per variant (interleaved)")
    ap.add_argument("--only", nargs="*", default=None, choices=VARIANTS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 3)
    if args.child:
        print(json.dumps(child(args.child, args.quick, steps)), flush=True)
        return {}
    rounds = args.rounds or (1 if args.quick else 2)
    variants = [v for v in VARIANTS if not args.only or v in args.only]
    print(f"memory: GPT-2 {config(args.quick)}, one process per run, {rounds} rounds", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads = []
    for r in range(rounds):
        for v in variants:
            runs[v].append(run_child(v, args.quick, steps))
            loads.append(list(os.getloadavg()))
            print(f"  round {r + 1}: {v}: train peak {runs[v][-1]['train_peak_rss_mb']:.0f} MB, "
                  f"with compile {runs[v][-1]['peak_rss_mb']:.0f} MB", flush=True)
    keys = ["baseline_rss_mb", "train_peak_rss_mb", "peak_rss_mb"] + (
        ["cuda_max_allocated_mb"] if "cuda_max_allocated_mb" in next(iter(runs.values()))[0] else [])
    results = {v: {k: statistics.median(x[k] for x in rs) for k in keys} | {"runs": rs} for v, rs in runs.items()}
    ref = results.get("hand loop")
    print(f"{'variant':<26} {'baseline MB':>12} {'train peak MB':>14} {'incl. compile':>14} {'vs hand (train)':>16}")
    for v, r in results.items():
        if ref:
            r["train_peak_vs_hand"] = r["train_peak_rss_mb"] / ref["train_peak_rss_mb"]
            r["train_growth_vs_hand"] = ((r["train_peak_rss_mb"] - r["baseline_rss_mb"])
                                         / max(ref["train_peak_rss_mb"] - ref["baseline_rss_mb"], 1e-9))
        ratio = f"{r['train_peak_vs_hand']:.3f}x" if ref else "-"
        print(f"{v:<26} {r['baseline_rss_mb']:>12.0f} {r['train_peak_rss_mb']:>14.0f} {r['peak_rss_mb']:>14.0f} "
              f"{ratio:>16}")
    report = {"quick": args.quick, "config": config(args.quick), "steps": steps, "rounds": rounds,
              "results": results, "loadavg_per_run": loads,
              "summary": {"functrain_donated_vs_hand": results.get("functrain donated", {}).get("train_peak_vs_hand"),
                          "target": 1.05}}
    C.write_report("memory", report, args.out)
    return report


if __name__ == "__main__":
    main()
