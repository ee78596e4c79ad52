"""Train N small models as ONE vmapped population step vs N ordinary steps, same data, same math.

    python benchmarks/ensemble.py                 # N=8 MLPs and N=8 tiny GPTs, eager
    python benchmarks/ensemble.py --compile       # also the compiled population (slow to compile)
    python benchmarks/ensemble.py --quick         # a tiny run (smoke test)

Variants, per model kind (each member: AdamW with its own learning rate / weight decay held as
tensors via ``inject_hyperparams``, its own init seed):

* ``sequential``: N ordinary ``make_train_step`` calls per step (one per member).
* ``population``: one ``make_population_train_step`` call per step (``torch.func.vmap``).
* ``sequential compiled`` and ``population compiled`` (``--compile``): the same under
  ``torch.compile`` (one compiled ordinary step serves all members: hyperparameters are tensors).

``--threads`` (default 1) sets torch's intra-op threads. On the shared 2-core machine this was
written on, 2 threads per process under other load made every small op wait on a busy core and
inflated the sequential times ~15x; 1 thread gives stable, honest ratios.

Each variant runs in its own subprocess (so its peak RSS is its own), times ``--steps`` steps
``--repeats`` times after warm-up, and reports the median milliseconds per step of all N members,
the speedup over ``sequential`` and the peak resident memory. Results go to
``benchmarks/results/ensemble.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import functrain as ft  # noqa: E402
from functrain import optim, population as P  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=64, classes=10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        logits = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class TinyGPTForCausalLM(nn.Module):
    """One pre-norm block, causal attention with scaled_dot_product_attention, tied embeddings."""

    def __init__(self, vocab=64, d=32, heads=2, block=16):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.register_buffer("pos", torch.arange(block), persistent=False)

    def forward(self, input_ids, labels=None):
        b, t = input_ids.shape
        x = self.wte(input_ids) + self.wpe(self.pos[:t])
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(a)
        x = x + self.mlp(self.ln2(x))
        logits = self.ln_f(x) @ self.wte.weight.T
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"logits": logits, "loss": loss}


def make_batches(kind: str, n: int, quick: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        size = 16 if quick else 64
        return [{"x": torch.randn(size, 32, generator=g), "labels": torch.randint(0, 10, (size,), generator=g)}
                for _ in range(n)]
    size, t = (4, 8) if quick else (16, 16)
    ids = [torch.randint(0, 64, (size, t), generator=g) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


MODELS = {"mlp": MLP, "gpt": TinyGPTForCausalLM}


def hyperparams(n: int) -> list[dict]:
    return [dict(learning_rate=1e-3 * (1 + i), weight_decay=0.01 * i) for i in range(n)]


def build(kind: str, variant: str, n: int):
    """``(run_one_step, read_params)`` for a variant; the state lives in a closure."""
    txf = optim.inject_hyperparams(optim.adamw)
    stacked, tx = P.create_population(MODELS[kind], txf, hyperparams(n), seeds=list(range(n)))
    if variant.startswith("sequential"):
        states = P.unstack_state(stacked)
        states = [ft.tree.clone(s) for s in states]
        if variant == "sequential compiled":
            # One compiled step serves every member: their hyperparameters are tensors in the state.
            steps = [ft.make_train_step(MODELS[kind](), tx, compile=True)] * n
        else:
            steps = [ft.make_train_step(MODELS[kind](), txf(**hp)) for hp in hyperparams(n)]
        box = {"states": states}

        def run(batch):
            box["states"] = [step(s, batch)[0] for step, s in zip(steps, box["states"])]

        return run, lambda: P.stack_states(box["states"]).params
    step = P.make_population_train_step(MODELS[kind](), tx, compile=variant == "population compiled")
    box = {"state": stacked}

    def run(batch):
        box["state"] = step(box["state"], batch)[0]

    return run, lambda: box["state"].params


def measure(kind: str, variant: str, n: int, steps: int, repeats: int, quick: bool) -> dict:
    batches = make_batches(kind, steps, quick)
    run, read = build(kind, variant, n)
    t0 = time.perf_counter()
    for b in batches[:2]:  # warm-up (compiles the compiled variant)
        run(b)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            run(b)
        times.append((time.perf_counter() - t0) * 1000 / steps)
    params = read()
    return {"median_ms": statistics.median(times), "all_ms": times, "warmup_s": warmup_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "param_checksum": float(sum(p.double().sum() for p in params.values()))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time the compiled population")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", default="mlp,gpt")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensemble.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or (3 if a.quick else 10)
    repeats = a.repeats or (2 if a.quick else 5)
    if a.one:  # child process: measure one variant, print JSON
        print(json.dumps(measure(a.one[0], a.one[1], a.members, steps, repeats, a.quick)))
        return {}
    variants = ["sequential", "population"] + (["sequential compiled", "population compiled"] if a.compile else [])
    results = {}
    for kind in a.models.split(","):
        results[kind] = {}
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", kind, variant, "--members", str(a.members), "--steps",
                   str(steps), "--repeats", str(repeats), "--threads", str(a.threads)] + (["--quick"] if a.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind}/{variant} failed:\n{proc.stderr[-3000:]}")
            results[kind][variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results[kind]["sequential"]["median_ms"]
        for r in results[kind].values():
            r["speedup_vs_sequential"] = base / r["median_ms"]
    report = {"members": a.members, "steps": steps, "repeats": repeats, "quick": a.quick,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "results": results}
    print(f"N={a.members} members, {steps} steps x {repeats} repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':6} {'variant':22} {'ms/step (all N)':>16} {'speedup':>8} {'peak RSS MB':>12}")
    for kind, rs in results.items():
        for variant, r in rs.items():
            print(f"{kind:6} {variant:22} {r['median_ms']:16.2f} {r['speedup_vs_sequential']:7.2f}x "
                  f"{r['peak_rss_mb']:12.0f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
