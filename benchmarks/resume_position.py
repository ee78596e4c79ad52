"""Resume position (target 7): start at step 100,000 of a 1M-example dataset.

    python benchmarks/resume_position.py
    python benchmarks/resume_position.py --quick

functrain: ``ResumableLoader.iter_from(epoch, 100_000)`` and the first batch (what
``Trainer.train(resume_from_checkpoint=...)`` does for the data position: it slices the epoch's
index permutation). HF: ``accelerate.skip_first_batches`` over a shuffled ``DataLoader`` of the
same dataset (what ``transformers.Trainer`` does on resume), then the first batch, for a few
``k``; the slope (s per 1000 skipped batches) extrapolates to k = 100,000. ``HF replay`` is the
older HF behaviour (and what an iterable dataset still needs): iterating and collating k batches.
Rounds interleave functrain and HF; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

try:
    from . import _common as C
except ImportError:
    import _common as C


class SyntheticTokens(torch.utils.data.Dataset):
    """``n`` examples of ``seq`` token ids, each a pure function of its index (no storage)."""

    def __init__(self, n: int, seq: int = 32, vocab: int = 1000):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = (torch.arange(self.seq) * 7 + i) % self.vocab
        return {"input_ids": ids, "labels": ids}


def functrain_first_batch(ds, batch_size: int, k: int) -> float:
    from functrain.data.loader import ResumableLoader

    t0 = time.perf_counter()
    loader = ResumableLoader(ds, batch_size, seed=0, shuffle=True)
    next(iter(loader.iter_from(0, k)))
    return time.perf_counter() - t0


def hf_first_batch(ds, batch_size: int, k: int) -> float:
    from accelerate import skip_first_batches

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)
    next(iter(skip_first_batches(loader, k)))
    return time.perf_counter() - t0


def replay_first_batch(ds, batch_size: int, k: int) -> float:
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g))
    for _ in range(k + 1):
        next(it)
    return time.perf_counter() - t0


def slope(ks: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * k``; returns (a, b)."""
    mk, ms = statistics.fmean(ks), statistics.fmean(seconds)
    b = sum((k - mk) * (s - ms) for k, s in zip(ks, seconds)) / sum((k - mk) ** 2 for k in ks)
    return ms - b * mk, b


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n, batch, target_k = (20_000, 8, 2_000) if args.quick else (1_000_000, 8, 100_000)
    hf_ks = [100, 200, 400] if args.quick else [1_000, 4_000, 16_000]
    replay_ks = [20, 40] if args.quick else [200, 800]
    rounds = args.rounds or (2 if args.quick else 5)
    ds = SyntheticTokens(n)
    import accelerate  # noqa: F401  imports are one-time costs, not data-position work
    import functrain.data.loader  # noqa: F401
    functrain_first_batch(SyntheticTokens(100), batch, 1)  # first-call costs (lazy imports inside datasets)
    print(f"resume position: {n:,} examples, batch {batch}, functrain at k={target_k:,}; HF skip k={hf_ks}, "
          f"replay k={replay_ks}; {rounds} rounds", flush=True)
    ft_s, hf_s, rp_s, loads = [], {k: [] for k in hf_ks}, {k: [] for k in replay_ks}, []
    for r in range(rounds):
        ft_s.append(functrain_first_batch(ds, batch, target_k))
        for k in hf_ks:
            hf_s[k].append(hf_first_batch(ds, batch, k))
        for k in replay_ks:
            rp_s[k].append(replay_first_batch(ds, batch, k))
        loads.append(list(os.getloadavg()))
        print(f"  round {r + 1}: functrain {ft_s[-1] * 1e3:.1f} ms; HF skip "
              + ", ".join(f"k={k}: {v[-1]:.3f} s" for k, v in hf_s.items()) + f"; load {loads[-1][0]:.2f}", flush=True)
    hf_med = {k: statistics.median(v) for k, v in hf_s.items()}
    rp_med = {k: statistics.median(v) for k, v in rp_s.items()}
    a, b = slope(list(hf_med), list(hf_med.values()))
    ra, rb = slope(list(rp_med), list(rp_med.values()))
    hf_at = a + b * target_k
    replay_at = ra + rb * target_k
    ft_med = statistics.median(ft_s)
    print(f"{'':<28} {'seconds':>10}")
    print(f"{'functrain iter_from':<28} {ft_med:>10.4f}   (target < 1 s)")
    print(f"{'HF skip_first_batches':<28} {hf_at:>10.3f}   extrapolated, slope {b * 1e3:.4f} s / 1000 batches")
    print(f"{'HF replay (collate)':<28} {replay_at:>10.3f}   extrapolated, slope {rb * 1e3:.4f} s / 1000 batches")
    print(f"HF skip / functrain = {hf_at / ft_med:.1f}x; replay / functrain = {replay_at / ft_med:.1f}x")
    report = {"quick": args.quick, "dataset_size": n, "batch_size": batch, "resume_batch": target_k, "rounds": rounds,
              "results": {"functrain": {"median_s": ft_med, "all_s": ft_s},
                          "hf_skip_first_batches": {"median_s_by_k": hf_med, "all_s_by_k": hf_s,
                                                    "slope_s_per_1000": b * 1e3, "intercept_s": a,
                                                    "extrapolated_s": hf_at},
                          "hf_replay": {"median_s_by_k": rp_med, "slope_s_per_1000": rb * 1e3,
                                        "extrapolated_s": replay_at}},
              "loadavg_per_round": loads,
              "summary": {"functrain_s": ft_med, "target_s": 1.0, "hf_extrapolated_s": hf_at,
                          "hf_slope_s_per_1000": b * 1e3, "replay_extrapolated_s": replay_at}}
    C.write_report("resume_position", report, args.out)
    return report


if __name__ == "__main__":
    main()
