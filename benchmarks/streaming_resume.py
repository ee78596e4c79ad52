"""Streaming resume (issue 18): continue a stream at batch 100,000 from its saved state.

    python benchmarks/streaming_resume.py
    python benchmarks/streaming_resume.py --quick

Two streams of 200,000 examples of 16 token ids (batch 1: batch 100,000 is example 100,000): a
``datasets.IterableDataset`` (Arrow, 64 shards) and a generator-backed torch ``IterableDataset``
with ``state_dict`` / ``load_state_dict``. For each, one pass reads up to the position and
saves the loader's state (JSON, what a checkpoint holds) and the next batches. Then,
rounds interleaved, the data work of a resume up to its first batch:

* ``stream state``: a new ``ResumableLoader``, ``load_state_dict(saved)``, first batch (what
  ``Trainer.train(resume_from_checkpoint=...)`` does for a stream);
* ``skip``: a new loader, ``iter_from(0, 100_000)`` without the stream's state, first batch: it
  reads the 100,000 examples before the position (what functrain did before, and what HF's
  ``skip_first_batches`` does for an iterable dataset).

The HF stream is also resumed with ``num_workers=2`` (its own pass, its own state).
Every resumed batch is checked equal to the uninterrupted run's. Medians; load average recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.utils.data as tud

try:
    from . import _common as C
except ImportError:
    import _common as C

SEQ = 16


class SyntheticStream(tud.IterableDataset):
    """``n`` examples of token ids, each a pure function of its index, made one at a time."""

    def __init__(self, n: int):
        self.n, self._next, self._start = n, 0, 0

    def state_dict(self) -> dict:
        return {"next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self._start = state["next"]

    def __iter__(self):
        first, self._start = self._start, 0
        for i in range(first, self.n):
            self._next = i + 1
            ids = (torch.arange(SEQ) * 7 + i) % 1000
            yield {"input_ids": ids, "labels": ids}


def hf_stream(n: int):
    import datasets

    ids = (np.arange(SEQ, dtype=np.int32)[None, :] * 7 + np.arange(n, dtype=np.int32)[:, None]) % 1000
    table = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    return table.to_iterable_dataset(num_shards=64).with_format("torch")


def loader(ds, batch: int, workers: int):
    from functrain.data import ResumableLoader

    return ResumableLoader(ds, batch, seed=0, shuffle=False, num_workers=workers)


def reference(ds, batch: int, k: int, workers: int, after: int = 2) -> tuple[dict, list, float]:
    """The state a checkpoint at batch ``k`` holds (JSON) and the ``after`` batches that follow.

    Reached by reading the stream to batch ``k - 1`` (no collation) and taking one batch: the
    loader's state there is the one an uninterrupted run records (tests/test_streaming_resume.py
    checks resumes against uninterrupted runs bitwise)."""
    t0 = time.perf_counter()
    lo = loader(ds, batch, workers)
    it = lo.iter_from(0, k - 1)
    next(it)
    saved = json.loads(json.dumps(lo.state_dict()))
    seconds = time.perf_counter() - t0
    return saved, [next(it) for _ in range(after)], seconds


def resume_with_state(ds, batch, k, workers, saved, expect) -> float:
    t0 = time.perf_counter()
    lo = loader(ds, batch, workers)
    lo.load_state_dict(saved)
    it = iter(lo)
    first = next(it)
    seconds = time.perf_counter() - t0
    _check([first, next(it)], expect)
    return seconds


def resume_by_skipping(ds, batch, k, workers, saved, expect) -> float:
    t0 = time.perf_counter()
    it = loader(ds, batch, workers).iter_from(0, k)
    first = next(it)
    seconds = time.perf_counter() - t0
    _check([first, next(it)], expect)
    return seconds


def _check(got: list, expect: list) -> None:
    for g, e in zip(got, expect):
        if not all(torch.equal(g[key], e[key]) for key in e):
            raise AssertionError("a resumed batch differs from the uninterrupted run's")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n, batch, k = (20_000, 1, 2_000) if args.quick else (200_000, 1, 100_000)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(1)
    streams = {"datasets": hf_stream(n), "torch": SyntheticStream(n)}
    cases = [("datasets", 0), ("torch", 0), ("datasets", 2)]
    print(f"streaming resume: {n:,} examples, batch {batch}, resume at batch {k:,}; {rounds} rounds", flush=True)
    saved, reference_s = {}, {}
    for name, workers in cases:  # the states a checkpoint would hold
        saved[name, workers] = reference(streams[name], batch, k, workers)
        reference_s[f"{name}, workers={workers}"] = saved[name, workers][2]
        print(f"  reference {name} workers={workers}: {saved[name, workers][2]:.1f} s to batch {k:,}", flush=True)
    contenders = {}
    for name, workers in cases:
        state, expect, _ = saved[name, workers]
        args_ = (streams[name], batch, k, workers, state, expect)
        contenders[f"{name}, workers={workers}: stream state"] = (resume_with_state, args_)
        if workers == 0:
            contenders[f"{name}, workers={workers}: skip"] = (resume_by_skipping, args_)
    times = {c: [] for c in contenders}
    loads = []
    for r in range(rounds):
        for c, (fn, fn_args) in contenders.items():
            times[c].append(fn(*fn_args))
        loads.append(list(os.getloadavg()))
        print(f"  round {r + 1}: " + "; ".join(f"{c} {t[-1]:.3f} s" for c, t in times.items())
              + f"; load {loads[-1][0]:.2f}", flush=True)
    medians = {c: statistics.median(t) for c, t in times.items()}
    print(f"{'resume to the first batch at ' + format(k, ','):<44} {'median s':>10}")
    for c, m in medians.items():
        print(f"{c:<44} {m:>10.4f}")
    summary = {}
    for name in ("datasets", "torch"):
        state_s, skip_s = medians[f"{name}, workers=0: stream state"], medians[f"{name}, workers=0: skip"]
        summary[name] = {"stream_state_s": state_s, "skip_s": skip_s, "skip_over_state": skip_s / state_s}
        print(f"{name}: skip / stream state = {skip_s / state_s:.0f}x (target: stream state < 1 s)")
    summary["datasets_workers2_stream_state_s"] = medians["datasets, workers=2: stream state"]
    report = {"quick": args.quick, "examples": n, "batch_size": batch, "resume_batch": k, "rounds": rounds,
              "results": {c: {"median_s": medians[c], "all_s": times[c]} for c in contenders},
              "reference_pass_s": reference_s, "loadavg_per_round": loads, "summary": summary,
              "bitwise_equal": True}
    C.write_report("streaming_resume", report, args.out)
    return report


if __name__ == "__main__":
    main()
