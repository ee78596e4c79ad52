"""Time one AdamW update: functrain (eager, compiled, compiled + donated) vs torch.optim.AdamW.

    python benchmarks/optimizer_update.py            # ~25M fp32 params in 200 tensors
    python benchmarks/optimizer_update.py --quick    # a tiny run (smoke test)

Variants, all doing the same AdamW math on the same parameters and gradients:

* ``functrain eager``: ``tx.update`` + ``apply_updates``, pure, out of place (fresh tensors).
* ``functrain compiled``: the same function under ``torch.compile`` (still out of place).
* ``functrain compiled+donated``: compiled, and the new params / moments are written back into the
  input storages with ``torch._foreach_copy_`` inside the compiled function, so inductor fuses
  the copy into the update kernel (what ``make_train_step(donate=True)`` does).
* ``functrain flat compiled+donated`` / ``functrain flat eager+donated``: the same update over the
  params packed in flat segments (:mod:`functrain.core.flat`; here one segment), as
  ``make_train_step(flat=True)`` runs it: one loop over 25M elements instead of 200 tensors;
  ``... 8 pieces``: eager, a piece of ~1/8 of the elements at a time (``leafwise_update=True``).
* ``torch foreach`` / ``torch fused``: ``torch.optim.AdamW(foreach=True)`` / ``(fused=True)``.
* ``copy (bandwidth)`` / ``triad (bandwidth)``: ``a.copy_(b)`` and ``a = b + 0.5 * c`` over flat
  buffers of as many fp32 elements as the params, timed in the same interleaved rounds: the
  machine's memory bandwidth now. Each update's GB/s counts the 7 arrays AdamW must move (p, g,
  m, v read; p, m, v written) and is reported as a fraction of the copy's GB/s.

Each variant runs ``--steps`` updates per repeat, ``--repeats`` times; the table shows the median
milliseconds per update and the ratio to ``torch fused``. Results go to
``benchmarks/results/optimizer_update.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import functrain.core.optim as optim  # noqa: E402
from functrain import tree  # noqa: E402
from functrain.core.flat import plan_layout  # noqa: E402
from functrain.step.grouped_update import GROUPS, apply_update_in_groups_  # noqa: E402

HP = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def make_shapes(quick: bool) -> list[tuple[int, ...]]:
    """~25M elements in 200 tensors (100 matrices 512x488 + 100 vectors 512), or a tiny set."""
    if quick:
        return [(64, 32)] * 5 + [(32,)] * 5
    return [(512, 488)] * 100 + [(512,)] * 100


def make_data(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i:03d}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in params.items()}
    return params, grads


def functrain_tx():
    return optim.adamw(HP["lr"], HP["b1"], HP["b2"], HP["eps"], HP["weight_decay"])


# -- variants: each returns a zero-argument function doing one update -------------------------


def functrain_eager(params, grads):
    tx = functrain_tx()
    box = [params, tx.init(params)]

    def step():
        p, s = box
        updates, s = tx.update(grads, s, p)
        box[:] = [optim.apply_updates(p, updates), s]

    return step


def _pure_step(tx):
    def step(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    return step


def functrain_compiled(params, grads):
    tx = functrain_tx()
    compiled = torch.compile(_pure_step(tx), fullgraph=True)
    box = [params, tx.init(params)]

    def step():
        box[:] = compiled(box[0], grads, box[1])

    return step


def functrain_compiled_donated(params, grads):
    tx = functrain_tx()
    pure = _pure_step(tx)

    def donated(params, grads, opt_state):
        new_params, new_state = pure(params, grads, opt_state)
        # Write the results into the input storages; inductor fuses this into the update.
        torch._foreach_copy_(tree.leaves(params), tree.leaves(new_params))
        torch._foreach_copy_(tree.leaves(opt_state), tree.leaves(new_state))

    compiled = torch.compile(donated, fullgraph=True)
    params = tree.clone(params)
    state = tx.init(params)
    return lambda: compiled(params, grads, state)


def _flat(params, grads):
    """The params and grads as flat segments (:mod:`functrain.core.flat`), as a flat step sees them."""
    layout = plan_layout(params, functrain_tx())
    return layout.pack(params), layout.pack(grads)


def functrain_flat_donated(params, grads):
    return functrain_compiled_donated(*_flat(params, grads))


def functrain_flat_eager_donated(params, grads):
    """Eager, flat, donated: the update over the segments, then copied into their storages."""
    tx = functrain_tx()
    params, grads = _flat(params, grads)
    state = tx.init(params)
    pure = _pure_step(tx)

    def step():
        new_params, new_state = pure(params, grads, state)
        tree.copy_((params, state), (new_params, new_state))

    return step


def functrain_flat_eager_pieces(params, grads):
    """Eager, flat, donated, in 8 pieces (``make_train_step(flat=True, donate=True,
    leafwise_update=True)``): each piece's results are written at once, so the temporaries are
    1/8 of the params (large temporaries cost page faults on every allocation)."""
    tx = functrain_tx()
    layout = plan_layout(params, tx, pieces=GROUPS)
    params, grads = layout.pack(params), layout.pack(grads)
    state = tx.init(params)
    return lambda: apply_update_in_groups_(tx, params, state, dict(grads))


def _torch_adamw(params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    opt = torch.optim.AdamW(ps, lr=HP["lr"], betas=(HP["b1"], HP["b2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], **kw)
    return opt.step


# Bandwidth references in the same interleaved run, over flat buffers of as many elements as the
# params: a copy (a = b) moves 2 x 4n bytes, a triad (a = b + s * c, STREAM's) 3 x 4n bytes.
BANDWIDTH = {"copy (bandwidth)": 2, "triad (bandwidth)": 3}
# What one AdamW update must move at least: p, g, m, v read; p, m, v written (fp32).
UPDATE_ARRAYS = 7


def _flat_buffers(params, k):
    n = tree.size(params)
    return [torch.randn(n) for _ in range(k)]


def bandwidth_copy(params, grads):
    a, b = _flat_buffers(params, 2)
    return lambda: a.copy_(b)


def bandwidth_triad(params, grads):
    a, b, c = _flat_buffers(params, 3)
    return lambda: torch.add(b, c, alpha=0.5, out=a)


def add_bandwidth(results: dict, n: int) -> dict:
    """GB/s of each contender (its bytes / its median time) and each update's fraction of the
    copy bandwidth measured in the same run."""
    for name, r in results.items():
        arrays = BANDWIDTH.get(name, UPDATE_ARRAYS)
        r["gb_per_s"] = arrays * 4 * n / (r["median_ms"] * 1e-3) / 1e9
    copy = results.get("copy (bandwidth)", {}).get("gb_per_s")
    for name, r in results.items():
        r["fraction_of_copy_bandwidth"] = r["gb_per_s"] / copy if copy and name not in BANDWIDTH else None
    return results


VARIANTS = {
    "functrain eager": functrain_eager,
    "functrain compiled": functrain_compiled,
    "functrain compiled+donated": functrain_compiled_donated,
    "functrain flat compiled+donated": functrain_flat_donated,
    "functrain flat eager+donated": functrain_flat_eager_donated,
    "functrain flat eager+donated, 8 pieces": functrain_flat_eager_pieces,
    "torch foreach": lambda p, g: _torch_adamw(p, g, foreach=True),
    "torch fused": lambda p, g: _torch_adamw(p, g, fused=True),
    "copy (bandwidth)": bandwidth_copy,
    "triad (bandwidth)": bandwidth_triad,
}


def time_interleaved(steps_by_name: dict, steps: int, repeats: int, warmup: int) -> dict:
    """Milliseconds per update, ``{name: [one value per repeat]}``.

    Variants take turns within each repeat, so a burst of load from other processes on a shared
    machine hits all of them alike instead of skewing one (the first ``warmup`` calls compile).
    """
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    out = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            out[name].append((time.perf_counter() - t0) * 1e3 / steps)
    return out


def check_agreement(params, grads, steps=3, flat=False) -> float:
    """Relative difference of the compiled update (over flat segments with ``flat``) vs torch fused
    after a few steps (sanity check)."""
    tx = functrain_tx()
    p = tree.clone(params)
    if flat:
        layout = plan_layout(params, tx)
        p, flat_grads = layout.pack(p), layout.pack(grads)
    s = tx.init(p)
    fn = torch.compile(lambda p, g, s: _pure_step(tx)(p, g, s), fullgraph=True)
    ref = [torch.nn.Parameter(x.clone()) for x in params.values()]
    opt = torch.optim.AdamW(ref, lr=HP["lr"], betas=(HP["b1"], HP["b2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], fused=True)
    for _ in range(steps):
        p, s = fn(p, flat_grads if flat else grads, s)
        for r, g in zip(ref, grads.values()):
            r.grad = g
        opt.step()
    if flat:
        p = layout.views(p)
    return tree.relative_difference(list(p.values()), [r.detach() for r in ref])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "optimizer_update.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 5)

    shapes = make_shapes(args.quick)
    params, grads = make_data(shapes)
    n = tree.size(params)
    print(f"AdamW update, {n:,} fp32 params in {len(shapes)} tensors, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {repeats} repeats x {steps} steps, median ms/update", flush=True)
    made, setup_s = {}, {}
    for name, make in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        made[name] = make(params, grads)
        made[name]()  # compile now, so setup time is measured per variant
        setup_s[name] = time.perf_counter() - t0
        print(f"  {name}: set up and first update in {setup_s[name]:.1f} s", flush=True)
    times = time_interleaved(made, steps, repeats, warmup=2)
    results = {name: {"median_ms": statistics.median(t), "all_ms": t, "setup_s": setup_s[name]}
               for name, t in times.items()}
    ref = results.get("torch fused", {}).get("median_ms")
    add_bandwidth(results, n)
    print(f"{'variant':<28} {'ms/update':>10} {'vs fused':>9} {'GB/s':>7} {'of copy':>8}")
    for name, r in results.items():
        r["ratio_vs_fused"] = r["median_ms"] / ref if ref else None
        ratio = f"{r['ratio_vs_fused']:.2f}x" if ref else "-"
        frac = f"{r['fraction_of_copy_bandwidth']:.0%}" if r["fraction_of_copy_bandwidth"] is not None else "-"
        print(f"{name:<28} {r['median_ms']:>10.2f} {ratio:>9} {r['gb_per_s']:>7.1f} {frac:>8}")
    agreement = check_agreement(params, grads)
    flat_agreement = check_agreement(params, grads, flat=True)
    print(f"compiled functrain vs torch fused after 3 steps: relative difference {agreement:.2e} "
          f"(over flat segments: {flat_agreement:.2e})")
    report = {
        "benchmark": "optimizer_update",
        "params": n,
        "tensors": len(shapes),
        "quick": args.quick,
        "steps": steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "relative_difference_vs_fused": agreement,
        "relative_difference_flat_vs_fused": flat_agreement,
        "loadavg": list(os.getloadavg()),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
