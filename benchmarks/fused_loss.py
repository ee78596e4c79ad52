"""Fused linear + cross-entropy vs the model's own loss: a Llama LM train step, vocab 32k, seq 512.

    python benchmarks/fused_loss.py
    python benchmarks/fused_loss.py --quick

Variants (same model, same batches, AdamW, compiled ``make_train_step``):

* ``plain``: ``model(**batch).loss`` (full ``[tokens, vocab]`` logits, their softmax and gradient);
* ``fused``: ``functrain.step.fused_loss.causal_lm_fused_loss`` (what ``use_liger_kernel=True``
  selects).

Each variant runs in its own process, glibc forced to serve large blocks by ``mmap`` (a freed
tensor leaves the process). The memory figure is the step's peak growth: ``VmHWM`` over the timed
steps minus the RSS just before them (model, optimizer state and the compiled step, alike in both
variants, are the baseline); on CUDA ``max_memory_allocated`` minus ``memory_allocated`` there.
Processes alternate and figures are medians over ``--rounds``. Targets: fused peak growth <= 0.6x
plain, fused time <= 1.1x plain. The machine is shared: ``uptime``'s load of each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

VARIANTS = ("plain", "fused")


def config(quick: bool) -> dict:
    if quick:
        return dict(vocab=512, seq=32, batch=2, hidden=32, layers=1)
    return dict(vocab=32000, seq=512, batch=4, hidden=256, layers=2)


def _model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                                        intermediate_size=2 * cfg["hidden"], num_hidden_layers=cfg["layers"],
                                        num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=cfg["seq"]))


def child(variant: str, quick: bool, steps: int) -> dict:
    import functrain as ft
    from functrain.step.fused_loss import causal_lm_fused_loss
    from functrain.step.train import make_train_step

    C.quiet_transformers()
    cfg = config(quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(cfg).to(device)
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels")}
               for b in C.lm_batches(2, cfg["batch"], cfg["seq"], cfg["vocab"])]
    tx = ft.optim.adamw(1e-4, weight_decay=0.0)
    step = make_train_step(model, tx, causal_lm_fused_loss if variant == "fused" else None, compile=True, donate=True)
    box = [ft.TrainState.create(model, tx, seed=0)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one(i):
        box[0], m = step(box[0], batches[i % 2])
        return m

    one(0)
    one(1)
    sync()
    baseline = C.status_mb("VmRSS")
    C.reset_peak_rss()
    if device == "cuda":
        cuda_baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        m = one(i)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    peak = C.status_mb("VmHWM")
    out = {"variant": variant, "baseline_rss_mb": baseline, "train_peak_rss_mb": peak,
           "peak_growth_mb": peak - baseline, "median_s": statistics.median(times), "times_s": times,
           "losses": losses, "loadavg": list(os.getloadavg()),
           "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    if device == "cuda":
        out["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - cuda_baseline) / 2**20
    return out


def run_child(variant: str, quick: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(steps)] + (["--quick"] if quick else [])
    return C.run_json_child(cmd)


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Medians per variant, and fused / plain ratios. Time: the median over rounds of each round's
    ratio (plain and fused ran back to back, so a round shares the machine's load)."""
    cuda = "cuda_peak_growth_mb" in runs["plain"][0]
    keys = ["peak_growth_mb", "train_peak_rss_mb", "median_s"] + (["cuda_peak_growth_mb"] if cuda else [])
    results = {v: {k: statistics.median(x[k] for x in rs) for k in keys} | {"runs": rs} for v, rs in runs.items()}
    mem_key = "cuda_peak_growth_mb" if cuda else "peak_growth_mb"
    per_round = [_ratio(f["median_s"], p["median_s"]) for p, f in zip(runs["plain"], runs["fused"])]
    summary = {"memory_key": mem_key,
               "fused_vs_plain_peak": _ratio(results["fused"][mem_key], results["plain"][mem_key]),
               "fused_vs_plain_time": statistics.median(per_round), "time_ratio_per_round": per_round,
               "fused_vs_plain_whole_process_peak": _ratio(results["fused"]["train_peak_rss_mb"],
                                                           results["plain"]["train_peak_rss_mb"]),
               "targets": {"peak": 0.6, "time": 1.1},
               "uptime": [x["uptime"] for rs in runs.values() for x in rs]}
    print(f"fused / plain: peak growth {summary['fused_vs_plain_peak']:.3f}x, time {summary['fused_vs_plain_time']:.3f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in per_round)}; whole-process peak "
          f"{summary['fused_vs_plain_whole_process_peak']:.3f}x)")
    return results, summary


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 4)
    if args.child:
        print(json.dumps(child(args.child, args.quick, steps)), flush=True)
        return {}
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"fused_loss: Llama {config(args.quick)}, one process per run, {rounds} rounds", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:
            runs[v].append(run_child(v, args.quick, steps))
            x = runs[v][-1]
            print(f"  round {r + 1}: {v}: peak growth {x['peak_growth_mb']:.0f} MB (RSS peak {x['train_peak_rss_mb']:.0f} MB), "
                  f"{x['median_s'] * 1e3:.0f} ms/step, load {x['loadavg'][0]:.2f}", flush=True)
    results, summary = summarize(runs)
    report = {"quick": args.quick, "config": config(args.quick), "steps": steps, "rounds": rounds,
              "results": results, "summary": summary}
    C.write_report("fused_loss", report, args.out)
    return report


if __name__ == "__main__":
    main()
