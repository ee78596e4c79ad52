"""Trainer step time: functrain's Trainer vs transformers' Trainer, default arguments, same run.

    python benchmarks/trainer_step.py                   # eager (both Trainers' default)
    python benchmarks/trainer_step.py --compiled        # torch_compile=True for both
    python benchmarks/trainer_step.py --quick           # tiny model (smoke test)
    python benchmarks/trainer_step.py --clock cpu       # process CPU time per step (a loaded machine)
    python benchmarks/trainer_step.py --compiled --gradient-checkpointing   # both, and the hand loop, recompute

Same model init (GPT-2 4 layers, width 256, 4 heads, vocab 2048, seq 128, batch 8), same batches,
same arguments left at their defaults (optimizer, schedule, clipping) but for ``max_steps``,
``learning_rate`` and no logging/saving. Each step is timed by the same callback in both Trainers,
from ``on_step_begin`` to ``on_step_end`` (forward, backward, clip, optimizer, schedule); the
``loop`` figure is the time between successive ``on_step_end`` calls (data loading and the
driver included). Rounds interleave the two Trainers (one ``train()`` each per round); the first
step of each round is dropped (optimizer creation, compilation). Medians over all rounds; the
load average is recorded before and after. Target (issue 18): functrain <= 1.0x HF, eager.
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
    from . import train_step as TS
except ImportError:
    import _common as C
    import train_step as TS

LR = 3e-4




def _callback(base, clock):
    """``_common.StepTimer`` as a subclass of ``base`` (each library's TrainerCallback)."""
    return type("Timer", (C.StepTimer, base), {})(clock)


def run_trainer(kind: str, model, dataset, steps: int, batch: int, compiled: bool, clock=time.perf_counter,
                checkpointing: bool = False):
    out_dir = tempfile.mkdtemp(prefix=f"{kind}_trainer_step_")
    common = dict(per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR, logging_strategy="no",
                  save_strategy="no", report_to="none", disable_tqdm=True, seed=0, torch_compile=compiled,
                  gradient_checkpointing=checkpointing)
    if kind == "hf":
        from transformers import Trainer, TrainerCallback, TrainingArguments

        args = TrainingArguments(out_dir, use_cpu=not torch.cuda.is_available(), **common)
    else:
        from functrain import Trainer, TrainerCallback, TrainingArguments

        args = TrainingArguments(out_dir, **common)
    timer = _callback(TrainerCallback, clock)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer]).train()
    return timer.step_s[1:], timer.loop_s[1:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--compiled", action="store_true", help="torch_compile=True for both Trainers")
    ap.add_argument("--steps", type=int, default=None, help="steps per train() call")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                    help="wall time (default) or this process's CPU time (on a machine loaded by other jobs)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="gradient_checkpointing=True for both Trainers (and the hand loop's model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 5)
    cfg = (dict(n_layer=1, n_embd=32, n_head=2, vocab=128, seq=16, batch=4) if args.quick
           else dict(n_layer=4, n_embd=256, n_head=4, vocab=2048, seq=128, batch=8))
    C.quiet_transformers()
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    dataset = C.ListDataset(C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"]))
    load_before = os.getloadavg()
    kinds = ("hf", "functrain") + (("hand",) if args.compiled else ())
    times = {k: ([], []) for k in kinds}
    batches = C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"])
    for _ in range(rounds):
        for kind in kinds:
            model = copy.deepcopy(base)
            if kind == "hand" and args.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            if kind == "hand":  # the compiled hand loop, the same settings as the Trainers' defaults
                one, _ = TS.hand_contender(model, batches, steps, compiled=True, lr=LR, total_steps=steps)
                step_s = C.timed_steps(one, steps, clock=C.CLOCKS[args.clock])[1:]
                times[kind][0].extend(step_s)
                times[kind][1].extend(step_s)
                continue
            step_s, loop_s = run_trainer(kind, model, dataset, steps, cfg["batch"], args.compiled, C.CLOCKS[args.clock],
                                         args.gradient_checkpointing)
            times[kind][0].extend(step_s)
            times[kind][1].extend(loop_s)
    med = {k: {"step_ms": 1e3 * statistics.median(s), "loop_ms": 1e3 * statistics.median(lp)}
           for k, (s, lp) in times.items()}
    mode = ("compiled" if args.compiled else "eager") + ("_checkpointing" if args.gradient_checkpointing else "")
    report = {"quick": args.quick, "mode": mode, "config": cfg, "rounds": rounds, "steps": steps,
              "clock": args.clock,
              "medians": med, "ratio_step": med["functrain"]["step_ms"] / med["hf"]["step_ms"],
              "ratio_loop": med["functrain"]["loop_ms"] / med["hf"]["loop_ms"], "loadavg_before": list(load_before)}
    if args.compiled:
        report["ratio_step_vs_compiled_hand"] = med["functrain"]["step_ms"] / med["hand"]["step_ms"]
        report["ratio_loop_vs_compiled_hand"] = med["functrain"]["loop_ms"] / med["hand"]["step_ms"]
        report["hf_step_vs_compiled_hand"] = med["hf"]["step_ms"] / med["hand"]["step_ms"]
        print(f"compiled hand loop {med['hand']['step_ms']:.1f} ms: functrain step "
              f"{report['ratio_step_vs_compiled_hand']:.3f}x, loop {report['ratio_loop_vs_compiled_hand']:.3f}x "
              f"(target <= 1.0), HF step {report['hf_step_vs_compiled_hand']:.3f}x")
    print(f"{report['mode']}: step {med['functrain']['step_ms']:.1f} ms vs HF {med['hf']['step_ms']:.1f} ms "
          f"({report['ratio_step']:.3f}x); loop {report['ratio_loop']:.3f}x")
    C.write_report("trainer_step", report, args.out or str(C.RESULTS / f"trainer_step_{report['mode']}.json"))
    return report


if __name__ == "__main__":
    main()
