"""Shared pieces of the benchmark scripts: machine info, interleaved timing, tables, JSON, models.

Every benchmark runs functrain and its references in the same process (except where a separate
process is the point), interleaves the contenders round by round (A B C A B C ...) so a change in
machine load hits all of them alike, takes medians, records ``os.getloadavg()`` next to every
round, prints a table with ratios and writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def interleave(contenders: dict[str, Callable[[], list[float]]], rounds: int, log=print) -> dict:
    """Run each contender once per round, in turn, ``rounds`` times.

    A contender is a zero-argument callable returning a list of per-step seconds for that round.
    Returns ``{name: {"all_s": [...], "median_s": ..., ...}, "_loadavg": [[1m, 5m, 15m] per round]}``.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    loads = []
    for r in range(rounds):
        for name, run in contenders.items():
            times[name].extend(run())
        loads.append(list(os.getloadavg()))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms"
                                                     for n, t in times.items()) + f"; load {loads[-1][0]:.2f}")
    out = {name: summarize(t) for name, t in times.items()}
    out["_loadavg"] = loads
    return out


def summarize(seconds: list[float]) -> dict:
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
            "n": len(seconds), "all_ms": [s * 1e3 for s in seconds]}


# --clock choices: wall time, or process CPU time (1 thread, on a loaded machine where wall time
# measures the other jobs).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_steps(step: Callable[[], object], n: int, sync: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of ``n`` calls of ``step`` by ``clock`` (``sync`` waits for the device, e.g. CUDA)."""
    out = []
    for _ in range(n):
        t0 = clock()
        step()
        if sync is not None:
            sync()
        out.append(clock() - t0)
    return out


def table(results: dict, reference: str, unit: str = "ms/step", key: str = "median_ms") -> str:
    """A text table: one row per contender, its median and its ratio to ``reference``."""
    ref = results[reference][key]
    width = max(len(n) for n in results if not n.startswith("_")) + 2
    lines = [f"{'contender':<{width}} {unit:>12} {'vs ' + reference:>24}"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        r[f"ratio_vs_{reference}"] = r[key] / ref
        lines.append(f"{name:<{width}} {r[key]:>12.3f} {r[key] / ref:>23.3f}x")
    return "\n".join(lines)


def write_report(name: str, report: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": name, "machine": machine(), "loadavg_at_end": list(os.getloadavg()), **report}
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return path


def quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- peak memory of a child process ---------------------------------------------------------------
# Each variant runs in its own process; glibc serves large blocks by mmap, so a freed tensor leaves
# the process and the peak RSS (VmHWM) follows what was alive at the worst moment.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Restart ``VmHWM`` from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_json_child(cmd: list[str], env: dict | None = None, mmap: bool = True) -> dict:
    """Run ``cmd`` (a benchmark's ``--child`` mode) with ``env`` (and ``MMAP_ENV`` if ``mmap``);
    its last stdout line, as JSON."""
    import subprocess

    env = {**os.environ, **(MMAP_ENV if mmap else {}), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- models and data ------------------------------------------------------------------------------


def gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, seq: int, seed: int = 0, dropout: float = 0.0):
    """A transformers GPT-2 built from a config (no download), sdpa attention."""
    quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def lm_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` batches of random token ids with labels = input_ids (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class ListDataset(torch.utils.data.Dataset):
    """Rows of a list of batches, as a map-style dataset (for the HF / functrain Trainers)."""

    def __init__(self, batches: list[dict]):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def linear_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """HF ``get_linear_schedule_with_warmup``'s multiplier, for a hand loop's ``LambdaLR``."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class StepTimer:
    """Trainer callback body (mix into a library's TrainerCallback): per-step seconds from
    ``on_step_begin`` to ``on_step_end``, and the loop time between successive ``on_step_end``s.
    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time: on a
    machine loaded by other jobs it leaves out the time spent waiting for a core)."""

    def __init__(self, clock=time.perf_counter):
        self.step_s, self.loop_s, self._t0, self._last_end = [], [], 0.0, None
        self.clock = clock

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = self.clock()

    def on_step_end(self, args, state, control, **kw):
        now = self.clock()
        self.step_s.append(now - self._t0)
        if self._last_end is not None:
            self.loop_s.append(now - self._last_end)
        self._last_end = now
