"""GPU train step: GPT-2 124M, bf16, tokens/s and MFU; functrain vs a hand loop vs the HF Trainer.

    python benchmarks/gpu_step.py                       # needs CUDA; GPT-2 124M, seq 1024, batch 8
    python benchmarks/gpu_step.py --batch 16 --rounds 5
    python benchmarks/gpu_step.py --dry-run --quick     # CPU, tiny model, no compile: checks the code path

Contenders, same init, same batches, bf16 autocast with fp32 master weights, AdamW (fused),
clip 1.0, linear schedule, all in this one process and interleaved round by round:

* ``functrain``: ``make_train_step(precision="bf16", compile=True, donate=True)``.
* ``hand loop compiled``: ``torch.compile(model)``, ``loss.backward()``, ``clip_grad_norm_``,
  ``AdamW(fused=True)``, ``LambdaLR`` (nanoGPT's loop).
* ``HF Trainer``: ``transformers.Trainer(bf16=True, torch_compile=True, optim="adamw_torch_fused")``,
  timed between successive ``on_step_end`` calls (with ``cuda.synchronize``).

Reported per contender: median step time, tokens/s, MFU = model FLOPs per token x tokens/s /
peak (default 989e12, H100 SXM bf16 dense; FLOPs per token = 6 N + 12 L d T as in nanoGPT/PaLM,
N without the position embedding), time to the first finished step (compile, target 5 on GPU),
and ``torch.cuda.max_memory_allocated`` over its round minus what was allocated when the round
began (target 4 on GPU; for strict per-process peaks run with ``--only NAME``).
Aims: functrain MFU >= 45% on an H100, >= 1.3x the HF Trainer's tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C

CONTENDERS = ("functrain", "hand loop compiled", "HF Trainer")
LR, TOTAL = 6e-4, 100_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run on CPU without compile (checks the code path only)")
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round per contender")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak bf16 dense TFLOP/s")
    ap.add_argument("--only", nargs="*", choices=CONTENDERS, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.batch, args.steps, args.rounds = min(args.seq, 32), min(args.batch, 2), 2, 1
    if args.batch < 1 or args.seq < 2 or args.steps < 1 or args.rounds < 1:
        ap.error("--batch, --steps and --rounds must be >= 1 and --seq >= 2")
    return args


def model_config(args) -> dict:
    if args.quick:
        return dict(n_layer=2, n_embd=64, n_head=2, vocab=256, seq=args.seq)
    return dict(n_layer=12, n_embd=768, n_head=12, vocab=50304, seq=args.seq)  # GPT-2 124M (padded vocab)


def flops_per_token(model, cfg) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["seq"]


def functrain_contender(model, batches, compile_):
    import functrain as ft
    from functrain.step.train import make_train_step

    tx = ft.optim.adamw(ft.schedules.linear(LR, 0, TOTAL), weight_decay=0.0)
    step = make_train_step(model, tx, precision="bf16", compile=compile_, donate=True, max_grad_norm=1.0)
    box = [ft.TrainState.create(model, tx, seed=0), 0]

    def one():
        box[0], _ = step(box[0], batches[box[1] % len(batches)])
        box[1] += 1

    return one


def hand_contender(model, batches, compile_, device_type):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.linear_lambda(0, TOTAL))
    fwd = torch.compile(model) if compile_ else model
    model.train()
    box = [0]

    def one():
        batch = batches[box[0] % len(batches)]
        box[0] += 1
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            loss = fwd(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return one


def hf_round(model, batches, steps, batch_size, compile_, sync):
    """One ``Trainer.train()`` of ``steps + 1`` steps; returns (first step s, per-step s after it)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync()
            self.ends.append(time.perf_counter())

    timer = Timer()
    targs = TrainingArguments(tempfile.mkdtemp(prefix="hf_gpu_"), per_device_train_batch_size=batch_size,
                              max_steps=steps + 1, learning_rate=LR, lr_scheduler_type="linear", weight_decay=0.0,
                              max_grad_norm=1.0, optim="adamw_torch_fused", bf16=True, torch_compile=compile_,
                              logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                              dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0)
    Trainer(model=model, args=targs, train_dataset=C.ListDataset([{k: v.cpu() for k, v in b.items()} for b in batches]),
            callbacks=[timer]).train()
    e = timer.ends
    return e[0] - timer.start, [b - a for a, b in zip(e, e[1:])]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_step.py needs CUDA, and torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}). Run it on a GPU machine, or pass --dry-run to check the code "
              "path on CPU.", file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if args.dry_run else "cuda"
    compile_ = not args.dry_run
    on_cuda = device == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(args)
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    fpt = flops_per_token(base, cfg)
    batches = [{k: v.to(device) for k, v in b.items()} for b in C.lm_batches(4, args.batch, args.seq, cfg["vocab"])]
    tokens = args.batch * args.seq
    names = [n for n in CONTENDERS if not args.only or n in args.only]
    print(f"gpu step on {C.machine()['cuda'] or 'CPU (dry run)'}: GPT-2 {cfg}, "
          f"{sum(p.numel() for p in base.parameters()):,} params, batch {args.batch}, {tokens} tokens/step, "
          f"compile={compile_}", flush=True)

    runners, first_step_s, models = {}, {}, {}
    for name in names:
        model = copy.deepcopy(base).to(device)
        models[name] = model
        if name == "HF Trainer":
            continue
        one = functrain_contender(model, batches, compile_) if name == "functrain" else \
            hand_contender(model, batches, compile_, device)
        t0 = time.perf_counter()
        one()
        sync()
        first_step_s[name] = time.perf_counter() - t0
        one()
        runners[name] = one

    times = {n: [] for n in names}
    peak_mb = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        for name in names:
            if on_cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            if name == "HF Trainer":
                first, per_step = hf_round(models[name], batches, args.steps, args.batch, compile_, sync)
                first_step_s.setdefault(name, first)
                times[name].extend(per_step)
            else:
                times[name].extend(C.timed_steps(runners[name], args.steps, sync))
            if on_cuda:
                peak_mb[name].append((torch.cuda.max_memory_allocated() - before) / 2**20)
        loads.append(list(C.os.getloadavg()))

    results = {}
    for name in names:
        s = C.summarize(times[name])
        step_s = s["median_ms"] / 1e3
        s["tokens_per_s"] = tokens / step_s
        s["mfu"] = fpt * s["tokens_per_s"] / (args.peak_tflops * 1e12)
        s["first_step_s"] = first_step_s.get(name)
        s["peak_mem_over_round_start_mb"] = statistics.median(peak_mb[name]) if peak_mb[name] else None
        results[name] = s
    print(f"{'contender':<22} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'first step s':>13}")
    for name, s in results.items():
        print(f"{name:<22} {s['median_ms']:>9.1f} {s['tokens_per_s']:>11.0f} {s['mfu'] * 100:>6.1f}% "
              f"{s['first_step_s'] or float('nan'):>13.1f}")
    summary = {}
    if "functrain" in results and "HF Trainer" in results:
        summary["functrain_vs_hf_tokens_per_s"] = results["functrain"]["tokens_per_s"] / results["HF Trainer"]["tokens_per_s"]
        print(f"functrain / HF Trainer tokens/s = {summary['functrain_vs_hf_tokens_per_s']:.2f}x (aim >= 1.3)")
    if "functrain" in results:
        summary["functrain_mfu"] = results["functrain"]["mfu"]
        print(f"functrain MFU = {summary['functrain_mfu'] * 100:.1f}% of {args.peak_tflops:.0f} TFLOP/s (aim >= 45%)")
    report = {"dry_run": args.dry_run, "quick": args.quick, "device": device, "config": cfg, "batch": args.batch,
              "tokens_per_step": tokens, "flops_per_token": fpt, "peak_tflops": args.peak_tflops,
              "steps_per_round": args.steps, "rounds": args.rounds, "results": results, "loadavg_per_round": loads,
              "summary": summary}
    C.write_report("gpu_step", report, args.out)
    return report


if __name__ == "__main__":
    main()
