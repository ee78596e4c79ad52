"""Where the GPT-2 step's time goes, and how far below the compiled hand loop a step can get.

    python benchmarks/step_floor.py --threads 1
    python benchmarks/step_floor.py --quick    # tiny model (smoke test)

The model, batches and contenders are ``train_step.py``'s: the compiled hand loop
(``torch.compile(model)`` + fused AdamW + clip + LambdaLR) and functrain's split step (compiled
gradients, fused AdamW in place after the graph, the Trainer's setting). For each, one profiled
run (``torch.profiler``, self CPU time per operator) splits a step into:

* ``matmul``: ``aten::mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` (the linear layers, both passes);
* ``attention``: the scaled-dot-product-attention kernels (forward and backward);
* ``compiled kernels``: inductor's generated code (layer norms, GELU, residuals, the loss...),
  the self time of its compiled graphs;
* ``update``: the fused optimizer, the gradient norm and the clip scaling;
* ``rest``: the wall time not in the above (Python, dispatch, allocation).

The matrix products are then replayed alone (same shapes, contiguous operands) and a 2048^3
``mm`` gives the machine's matmul rate, so the report says what fraction of a step runs at
that rate and how much of everything else a step at ``target`` x the hand loop would have to
remove. Wall times come from interleaved unprofiled rounds, as in the other scripts.
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import statistics
import time

import torch

try:
    from . import _common as C
    from . import train_step as T
except ImportError:
    import _common as C
    import train_step as T

TARGET = 0.95
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
UPDATE = ("aten::_fused_adamw_", "aten::linalg_vector_norm", "aten::_foreach_norm", "aten::_foreach_mul_",
          "aten::mul_", "aten::clamp", "aten::reciprocal")


def category(op: str) -> str:
    if op in MATMUL:
        return "matmul"
    if "scaled_dot_product" in op:
        return "attention"
    if op.startswith("## Call CompiledFxGraph"):
        return "compiled kernels"
    if op in UPDATE:
        return "update"
    return "rest"


def profile_step(one, steps: int) -> dict:
    """Per-step self CPU ms by category and the matmul calls ``(op, shapes) -> calls per step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
    by_category = collections.Counter()
    for event in prof.key_averages():
        by_category[category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    by_category["rest"] += wall_ms - sum(by_category.values())  # time outside any operator
    calls = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in MATMUL:
            calls[(event.key, str(event.input_shapes))] = event.count / steps
    return {"profiled_wall_ms": wall_ms, "ms": dict(by_category), "matmul_calls": calls}


def _operand_shapes(op: str, shapes: list) -> list[list[int]]:
    """The operands' shapes (inductor calls the ``out=`` overloads: the output shape comes last)."""
    n = 3 if op in ("aten::addmm", "aten::baddbmm") else 2
    return shapes[:n]


def replay_matmuls(calls: dict, repeats: int) -> float:
    """Median ms of running the step's matrix products alone (operands made contiguous)."""
    work = []
    for (op, shapes), per_step in calls.items():
        fn = getattr(torch.ops.aten, op.split("::")[1])
        operands = [torch.randn(*d) for d in _operand_shapes(op, ast.literal_eval(shapes))]
        work.append((fn, operands, round(per_step)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fn, operands, n in work:
            for _ in range(n):
                fn(*operands)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_rate_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def matmul_gflop(calls: dict) -> float:
    total = 0.0
    for (op, shapes), per_step in calls.items():
        a, b = _operand_shapes(op, ast.literal_eval(shapes))[-2:]  # addmm's bias comes first
        batch = a[0] if len(a) == 3 else 1
        total += 2 * batch * a[-2] * a[-1] * b[-1] * round(per_step)
    return total / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per round and per profile")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, rounds = args.steps or (2 if args.quick else 5), args.rounds or (2 if args.quick else 5)
    cfg = T.config(args.quick)
    C.quiet_transformers()
    base = C.gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab"], cfg["seq"])
    batches = C.lm_batches(8, cfg["batch"], cfg["seq"], cfg["vocab"])
    print(f"step floor: GPT-2 {cfg}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    makers = {T.REFERENCE: lambda m: T.hand_contender(m, batches, steps, compiled=True),
              "functrain split": lambda m: T.functrain_contender(m, batches, steps, split=True)}
    ones, runs = {}, {}
    for name, make in makers.items():
        ones[name], run = make(copy.deepcopy(base))
        for _ in range(3):
            ones[name]()  # compile and warm
        runs[name] = lambda run=run: run()[1:]
    results = C.interleave(runs, rounds)
    loads = results.pop("_loadavg")
    print(C.table(results, T.REFERENCE))
    profiles = {name: profile_step(one, steps) for name, one in ones.items()}
    rate = matmul_rate_gflops(256 if args.quick else 2048, 5)
    hand = profiles[T.REFERENCE]
    replay_ms = replay_matmuls(hand["matmul_calls"], 5)
    gflop = matmul_gflop(hand["matmul_calls"])
    hand_ms = results[T.REFERENCE]["median_ms"]
    scale = hand_ms / hand["profiled_wall_ms"]  # profiled times, scaled to the unprofiled step
    kernel_floor_ms = (hand["ms"].get("matmul", 0) + hand["ms"].get("attention", 0)) * scale
    other_ms = hand_ms - kernel_floor_ms
    must_remove_ms = hand_ms * (1 - TARGET)
    summary = {
        "compiled_hand_loop_ms": hand_ms,
        "functrain_split_vs_compiled_hand": results["functrain split"]["median_ms"] / hand_ms,
        "machine_matmul_gflops": rate,
        "step_matmul_gflop": gflop,
        "step_matmul_gflops_in_step": gflop / (hand["ms"].get("matmul", 0) * scale / 1e3),
        "step_matmuls_replayed_alone_ms": replay_ms,
        "matmul_and_attention_share_of_step": kernel_floor_ms / hand_ms,
        "everything_else_ms": other_ms,
        "target_must_remove_ms": must_remove_ms,
        "target_must_remove_share_of_everything_else": must_remove_ms / other_ms if other_ms > 0 else None,
        "target": TARGET,
    }
    for name, p in profiles.items():
        print(f"{name}: profiled {p['profiled_wall_ms']:.1f} ms/step: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["ms"].items(), key=lambda kv: -kv[1])))
    print(", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in summary.items()))
    for p in profiles.values():
        p["matmul_calls"] = {f"{op} {shapes}": n for (op, shapes), n in p["matmul_calls"].items()}
    report = {"quick": args.quick, "config": cfg, "steps": steps, "rounds": rounds, "results": results,
              "profiles": profiles, "loadavg_per_round": loads, "summary": summary}
    C.write_report("step_floor", report, args.out)
    return report


if __name__ == "__main__":
    main()
