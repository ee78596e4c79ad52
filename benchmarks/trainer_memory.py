"""Peak memory growth of a whole ``Trainer.train()`` run: functrain's Trainer vs transformers'.

    python benchmarks/trainer_memory.py                 # eager, 3 rounds
    python benchmarks/trainer_memory.py --compiled      # adds torch_compile=True for both
    python benchmarks/trainer_memory.py --compiled --no-eager --out benchmarks/results/trainer_memory_compiled.json
    python benchmarks/trainer_memory.py --quick

Same model (GPT-2, 6 layers, d512, vocab 8192: ~23M parameters), same data (4 x 128 tokens per
step), same arguments (defaults: AdamW fused for HF, AdamW for functrain, clip 1.0, linear
schedule), ``max_steps=4``, no saving, no logging to trackers. Each run is its own process with
glibc forced to serve large blocks by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed memory
leaves the process and the peak RSS (``VmHWM``) is what was alive at the worst moment.

Figure: growth = peak RSS over the run - RSS after the model and the Trainer are built (the
optimizer state, gradients, activations and any extra copy of the params). Per phase (first step,
with compilation; later steps; between steps) the peak and the RSS at its end are recorded too. Both processes import
``datasets``, ``transformers.trainer`` and ``functrain`` before that baseline, so one-time library
imports (which HF pays at import, functrain at its first dataset) are not counted for either. Processes run
interleaved (HF, functrain, HF, functrain, ...); medians; ``os.getloadavg()`` per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

try:
    from . import _common as C
except ImportError:
    import _common as C

VARIANTS = ("transformers", "functrain")


def config(quick: bool) -> dict:
    if quick:
        return dict(n_layer=1, n_embd=64, n_head=2, vocab=512, seq=32, batch=4)
    return dict(n_layer=6, n_embd=512, n_head=8, vocab=8192, seq=128, batch=4)


def child(variant: str, quick: bool, steps: int, compiled: bool) -> dict:
    import torch

    # Both processes import the same libraries before the baseline: transformers' Trainer imports
    # `datasets` (~85 MB of RSS) when it is imported, functrain when it first meets a dataset.
    import datasets  # noqa: F401
    import transformers.trainer  # noqa: F401

    import functrain  # noqa: F401

    torch.set_num_threads(1)
    cfg = config(quick)
    model = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    data = C.ListDataset(C.lm_batches(steps, cfg["batch"], cfg["seq"], cfg["vocab"]))
    out_dir = tempfile.mkdtemp(prefix="trainer_memory_")
    common = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=cfg["batch"], report_to=[],
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, torch_compile=compiled,
                  use_cpu=True)
    if variant == "transformers":
        import transformers

        phases = phase_callback(transformers.TrainerCallback)
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=data,
                                       callbacks=[phases])
    else:
        import functrain as ft

        phases = phase_callback(ft.TrainerCallback)
        trainer = ft.Trainer(model=model, args=ft.TrainingArguments(**common), train_dataset=data, callbacks=[phases])
    phases.start()
    trainer.train()
    phases.mark()  # the last phase: after the last step, to the end of train()
    peak = max(p["peak_mb"] for p in phases.phases)
    return {"variant": variant, "params": sum(p.numel() for p in model.parameters()), "baseline_rss_mb": phases.baseline,
            "peak_rss_mb": phases.baseline + peak, "growth_mb": peak, "phases": phases.phases}


def phase_callback(base: type):
    """A callback (of the Trainer's own ``TrainerCallback`` class) that splits the run into phases:
    before the first step, each step (``on_step_begin`` -> ``on_step_end``) and after each step
    (to the next step, or to the end of ``train()``). Per phase: the peak RSS and the RSS at its end, over the baseline (MB); the
    peak restarts at each boundary (``/proc/self/clear_refs``), so the run's peak is their max.
    The first step holds compilation (both Trainers compile at their first forward)."""

    class Phases(base):
        def start(self):
            self.baseline, self.phases, self.name = C.status_mb("VmRSS"), [], "before the first step"
            C.reset_peak_rss()

        def mark(self, next_name: str | None = None):
            self.phases.append({"phase": self.name, "peak_mb": C.status_mb("VmHWM") - self.baseline,
                                "end_mb": C.status_mb("VmRSS") - self.baseline})
            self.name = next_name
            C.reset_peak_rss()

        def on_step_begin(self, args, state, control, **kwargs):
            self.mark(f"step {state.global_step + 1}")

        def on_step_end(self, args, state, control, **kwargs):
            self.mark(f"after step {state.global_step}")

    return Phases()


def run_child(variant: str, quick: bool, steps: int, compiled: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(steps)]
    cmd += (["--quick"] if quick else []) + (["--compiled"] if compiled else [])
    return C.run_json_child(cmd, {"OMP_NUM_THREADS": "1"})


def measure(quick: bool, steps: int, rounds: int, compiled: bool) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:
            res = run_child(v, quick, steps, compiled)
            res["loadavg"] = list(os.getloadavg())
            runs[v].append(res)
            print(f"  {'compiled' if compiled else 'eager'} round {r + 1}: {v}: growth {res['growth_mb']:.0f} MB "
                  f"(peak {res['peak_rss_mb']:.0f} MB); load {res['loadavg'][0]:.2f}", flush=True)
            print("    " + "; ".join(f"{p['phase']}: peak {p['peak_mb']:.0f}, end {p['end_mb']:.0f}"
                                     for p in res["phases"]), flush=True)
    out = {v: {"growth_mb": statistics.median(x["growth_mb"] for x in rs),
               "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs), "runs": rs} for v, rs in runs.items()}
    out["growth_ratio"] = out["functrain"]["growth_mb"] / out["transformers"]["growth_mb"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--compiled", action="store_true", help="measure torch_compile=True too")
    ap.add_argument("--no-eager", action="store_true", help="with --compiled: only the compiled runs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.steps, args.compiled)), flush=True)
        return {}
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"trainer memory: GPT-2 {config(args.quick)}, {args.steps} steps, one process per run", flush=True)
    results = {} if args.no_eager and args.compiled else {"eager": measure(args.quick, args.steps, rounds, False)}
    if args.compiled:
        results["compiled"] = measure(args.quick, args.steps, rounds, True)
    for mode, r in results.items():
        print(f"{mode}: transformers.Trainer growth {r['transformers']['growth_mb']:.0f} MB, functrain.Trainer "
              f"{r['functrain']['growth_mb']:.0f} MB: {r['growth_ratio']:.3f}x (target <= 1.05x)")
    report = {"quick": args.quick, "config": config(args.quick), "steps": args.steps, "rounds": rounds,
              "results": results}
    if not args.quick or args.out:  # (a quick run writes only where asked: the smoke test)
        C.write_report("trainer_memory", report, args.out)
    return report


if __name__ == "__main__":
    main()
