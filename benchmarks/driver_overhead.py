"""Driver overhead (target 6): a ``Trainer.train()`` step minus the bare compiled step, in µs.

    python benchmarks/driver_overhead.py
    python benchmarks/driver_overhead.py --quick

A small MLP (so the step is short and the driver's share is visible) is trained by
``functrain.Trainer(torch_compile=True)``. A callback, at every ``on_step_begin``, first runs the
bare step once (``make_train_step`` with the same optimizer, clipping and ``compile=True`` on a
copy of the model, on an already-collated batch) and times it, then starts the Trainer's clock;
the next ``on_step_begin`` stops it. So the two contenders alternate step by step under the same
load, and the Trainer's figure is everything one loop iteration costs: fetching and collating
the batch from the dataset, the step, callbacks, the log/save/evaluate checks, token counting.
The difference of the medians is the driver overhead (data loading included). Logging steps are
outside the measured window (``logging_steps`` > steps); the test
``tests/test_trainer_host_sync.py`` checks that non-logging steps never read a tensor on the host.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from torch import nn

try:
    from . import _common as C
except ImportError:
    import _common as C


class MLPRegressor(nn.Module):
    """``forward(x, labels) -> {"loss"}``: an MLP with an MSE loss, Trainer-ready."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        mods = []
        for _ in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*mods[:-1])

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def config(quick: bool) -> dict:
    return dict(width=16, layers=2, batch=4, steps=12, warmup=4) if quick else \
        dict(width=64, layers=4, batch=16, steps=300, warmup=20)


def make_rows(n: int, width: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(width, generator=g), "labels": torch.randn(width, generator=g)} for _ in range(n)]


def main(argv=None) -> dict:
    import functrain as ft
    from functrain import Trainer, TrainerCallback, TrainingArguments
    from functrain.data.collators import default_data_collator
    from functrain.step.train import make_train_step

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args.quick)
    steps = args.steps or cfg["steps"]
    torch.manual_seed(0)
    model = MLPRegressor(cfg["width"], cfg["layers"])
    rows = make_rows(cfg["batch"] * 64, cfg["width"])
    batches = [default_data_collator(rows[i:i + cfg["batch"]]) for i in range(0, len(rows), cfg["batch"])]
    out_dir = tempfile.mkdtemp(prefix="driver_bench_")
    targs = TrainingArguments(out_dir, per_device_train_batch_size=cfg["batch"], max_steps=steps,
                              learning_rate=1e-3, logging_steps=steps + 1, save_strategy="no", torch_compile=True,
                              disable_tqdm=True, report_to="none", seed=0)

    # The bare step: what Trainer builds (linear schedule, AdamW, clip 1.0, compile, no donation).
    bare_model = copy.deepcopy(model)
    tx = ft.optim.adamw(ft.schedules.linear(1e-3, 0, steps), weight_decay=0.0)
    bare_step = make_train_step(bare_model, tx, compile=True, max_grad_norm=1.0)
    bare = {"state": ft.TrainState.create(bare_model, tx, seed=0), "i": 0}

    def bare_once() -> float:
        t0 = time.perf_counter()
        bare["state"], _ = bare_step(bare["state"], batches[bare["i"] % len(batches)])
        bare["i"] += 1
        return time.perf_counter() - t0

    class Alternate(TrainerCallback):
        def __init__(self):
            self.trainer_s, self.bare_s, self.loads, self._t = [], [], [], None

        def on_step_begin(self, args, state, control, **kw):
            now = time.perf_counter()
            if self._t is not None:
                self.trainer_s.append(now - self._t)
            self.bare_s.append(bare_once())
            if state.global_step % 50 == 0:
                self.loads.append(list(__import__("os").getloadavg()))
            self._t = time.perf_counter()

    print(f"driver overhead: MLP {cfg}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{steps} steps", flush=True)
    alt = Alternate()
    Trainer(model=model, args=targs, train_dataset=C.ListDataset([{"x": b["x"], "labels": b["labels"]}
                                                                  for b in batches]), callbacks=[alt]).train()
    w = cfg["warmup"]
    trainer_s, bare_s = alt.trainer_s[w:], alt.bare_s[w + 1:]  # interval k pairs with bare run k+1
    results = {"Trainer.train() step": C.summarize(trainer_s), "bare compiled step": C.summarize(bare_s)}
    overhead_us = (results["Trainer.train() step"]["median_ms"] - results["bare compiled step"]["median_ms"]) * 1e3
    paired = [t - b for t, b in zip(trainer_s, bare_s)]
    print(C.table(results, "bare compiled step"))
    print(f"driver overhead per step: {overhead_us:.0f} us (difference of medians); "
          f"median of paired differences {statistics.median(paired) * 1e6:.0f} us")
    report = {"quick": args.quick, "config": cfg, "steps": steps, "warmup_steps_dropped": w, "results": results,
              "loadavg_samples": alt.loads,
              "summary": {"overhead_us": overhead_us, "paired_median_overhead_us": statistics.median(paired) * 1e6}}
    C.write_report("driver_overhead", report, args.out)
    return report


if __name__ == "__main__":
    main()
