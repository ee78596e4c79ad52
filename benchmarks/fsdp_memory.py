"""Per-rank peak memory of sharded training vs data parallel: 4 gloo ranks, a 24-layer MLP (~25M).

    python benchmarks/fsdp_memory.py            # 4 ranks, 24 x Linear(1024, 1024)
    python benchmarks/fsdp_memory.py --quick    # 2 ranks, a small model (a smoke run)

Variants, each one ``torchrun`` launch (AdamW, accumulation 2, same batches, eager):

* ``ddp``: every rank holds the whole state; gradients all-reduced (``data_parallel_hooks``).
* ``sharded, gathered before forward``: ``DTensor`` shards, every param all-gathered before the
  forward (``sharded_hooks``): a full replica lives through forward and backward.
* ``sharded in use``: ``DTensor`` shards built from a meta-device model
  (``sharded_state_from_meta``), each layer gathered where it runs and re-gathered in backward
  (``shard_in_use``).
* ``trainer ddp`` / ``trainer sharded``: the whole run through the Trainer (``model_init``;
  ``fsdp="full_shard"`` builds it on meta), then its end: the checkpoint saved at the last step,
  the end of ``train()``, ``save_model()`` and ``evaluate()``. Reported separately: the peak of
  the steps (``VmHWM`` at the last ``on_step_end``) and the peak of the end (``VmHWM`` reset
  there with ``/proc/self/clear_refs``, read after ``evaluate()``), both over the same baseline
  (taken after a warm-up run of a 1-layer model, so imports and one-time allocations are out).

The measure: each rank's peak RSS over its life (``VmHWM``) minus its RSS after ``import torch``
and joining the process group (before the model exists), with glibc forced to return every large
block to the system on free (``MALLOC_MMAP_THRESHOLD_=65536``, so RSS follows live tensors rather
than allocator caching). Reported: the maximum over ranks, median over ``--rounds``, and the
ratio to ``ddp``. Target: sharded in use <= 0.40x ddp.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from . import _common as C
except ImportError:
    import _common as C

VARIANTS = ("ddp", "sharded, gathered before forward", "sharded in use", "trainer ddp", "trainer sharded")
MMAP_THRESHOLD = "65536"


def config(quick: bool) -> dict:
    if quick:
        return dict(world=2, layers=4, width=64, batch=8, steps=2)
    return dict(world=4, layers=24, width=1024, batch=8, steps=3)  # 24 x (1024^2 + 1024) ~= 25.2M params


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model(layers: int, width: int):
    from torch import nn

    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks)


def _loss_fn(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _regressor(layers: int, width: int):
    """The MLP as a Trainer model: ``forward(x, labels) -> {"loss"}``."""
    from torch import nn

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model(layers, width)

        def forward(self, x, labels):
            return {"loss": ((self.net(x) - labels) ** 2).mean()}

    return Regressor()


def trainer_main(variant: str, cfg: dict, out: str) -> dict:
    """One rank of a Trainer variant: peak growth during the steps and during the end of the run."""
    import dataclasses

    import torch

    import functrain as ft
    from functrain import distributed as fd

    torch.set_num_threads(1)
    fd.init_distributed()
    g = torch.Generator().manual_seed(1)
    n = cfg["batch"] * 2 * fd.world_size() * cfg["steps"]
    data = [{"x": x, "labels": y} for x, y in zip(torch.randn(n, cfg["width"], generator=g),
                                              torch.randn(n, cfg["width"], generator=g))]
    args = ft.TrainingArguments(out + "/run", max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                                gradient_accumulation_steps=2, optim="adamw_torch", learning_rate=1e-3,
                                save_strategy="steps", save_steps=cfg["steps"], report_to="none", disable_tqdm=True,
                                per_device_eval_batch_size=cfg["batch"], seed=0,
                                fsdp="full_shard" if variant == "trainer sharded" else "")
    # Warm-up: a 1-layer model through the same path loads what the Trainer imports and allocates once.
    ft.Trainer(model_init=lambda: _regressor(1, cfg["width"]), train_dataset=data,
               args=dataclasses.replace(args, output_dir=out + "/warm", save_strategy="no", max_steps=1)).train()
    _reset_peak()
    baseline = _status_mb("VmRSS")
    peaks = {}

    class Peaks(ft.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == cfg["steps"]:
                peaks["steps"] = _status_mb("VmHWM") - baseline
                _reset_peak()  # from here: the end of the run

    trainer = ft.Trainer(model_init=lambda: _regressor(cfg["layers"], cfg["width"]), args=args, train_dataset=data,
                         eval_dataset=data[:cfg["batch"] * fd.world_size()], callbacks=[Peaks()])
    trainer.train()
    trainer.save_model(out + "/final")
    loss = trainer.evaluate()["eval_loss"]
    peaks["end"] = _status_mb("VmHWM") - baseline
    fd.barrier()
    return {"rank": fd.rank(), "peak_growth_mb": max(peaks.values()), "steps_peak_growth_mb": peaks["steps"],
            "end_peak_growth_mb": peaks["end"], "state_local_mb": fd.local_nbytes(trainer.train_state) / 2**20,
            "params": sum(p.numel() for p in trainer.model.parameters()), "last_loss": loss}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")


def rank_main(variant: str, cfg: dict, out: str) -> dict:
    """One rank of one variant (under torchrun): its memory figures (``out``: a folder all ranks share)."""
    if variant.startswith("trainer"):
        return trainer_main(variant, cfg, os.path.join(out, "work"))
    import torch

    import functrain as ft
    from functrain import distributed as fd
    from functrain.parallel import fsdp

    torch.set_num_threads(1)
    fd.init_distributed()
    baseline = _status_mb("VmRSS")
    torch.manual_seed(0)
    tx = ft.optim.adamw(1e-3)
    if variant == "ddp":
        model = _model(cfg["layers"], cfg["width"])
        state = ft.TrainState.create(model, tx)  # shares the module's tensors: one copy
        grad_reduce, count_reduce = fd.data_parallel_hooks()
        hooks = {"grad_reduce": grad_reduce, "count_reduce": count_reduce}
    else:
        with torch.device("meta"):
            model = _model(cfg["layers"], cfg["width"])
        state = fsdp.sharded_state_from_meta(model, tx)
        hooks = fsdp.sharded_in_use_hooks(model) if variant == "sharded in use" else fd.sharded_hooks()
    after_state = _status_mb("VmRSS")
    step = ft.make_train_step(model, tx, _loss_fn, accumulate=2, count_items=lambda b: torch.tensor(b["x"].shape[0]),
                              **hooks)
    g = torch.Generator().manual_seed(1 + fd.rank())
    for _ in range(cfg["steps"]):
        batch = {"x": torch.randn(cfg["batch"], cfg["width"], generator=g),
                 "y": torch.randn(cfg["batch"], cfg["width"], generator=g)}
        state, metrics = step(state, batch)
    loss = float(fd.reduce_metrics(metrics)["loss"])
    return {"rank": fd.rank(), "peak_growth_mb": _status_mb("VmHWM") - baseline,
            "state_growth_mb": after_state - baseline, "state_local_mb": fd.local_nbytes(state) / 2**20,
            "params": sum(p.numel() for p in model.parameters()), "last_loss": loss}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, cfg: dict, quick: bool) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg["world"]), "--master_port",
               str(_free_port()), __file__, "--rank-of", variant, "--results", out] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--results", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = ap.parse_args(argv)
    cfg = config(args.quick)
    if args.rank_of:
        result = rank_main(args.rank_of, cfg, args.results)
        (Path(args.results) / f"rank{result['rank']}.json").write_text(json.dumps(result))
        return {}
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"fsdp_memory: {cfg}, {rounds} rounds, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}", flush=True)
    variants = VARIANTS if args.variants is None else tuple(v.strip() for v in args.variants.split(","))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    runs: dict[str, list[list[dict]]] = {v: [] for v in variants}
    loads = []
    for r in range(rounds):
        for v in variants:
            runs[v].append(run_variant(v, cfg, args.quick))
            loads.append(list(os.getloadavg()))
            peak = max(x["peak_growth_mb"] for x in runs[v][-1])
            end = max((x["end_peak_growth_mb"] for x in runs[v][-1] if "end_peak_growth_mb" in x), default=None)
            print(f"  round {r + 1}: {v}: max per-rank peak growth {peak:.0f} MB"
                  + (f" (end of the run {end:.0f} MB)" if end is not None else ""), flush=True)
    summary = {}
    for v in variants:
        summary[v] = {"peak_growth_mb": statistics.median(max(x["peak_growth_mb"] for x in run) for run in runs[v]),
                      "state_local_mb": max(x["state_local_mb"] for x in runs[v][0]),
                      "last_loss": runs[v][0][0]["last_loss"]}
        for phase in ("steps_peak_growth_mb", "end_peak_growth_mb"):
            if phase in runs[v][0][0]:
                summary[v][phase] = statistics.median(max(x[phase] for x in run) for run in runs[v])
    for v in variants:
        ref = summary.get("trainer ddp" if v.startswith("trainer") else "ddp", {}).get("peak_growth_mb", float("nan"))
        summary[v]["ratio_to_ddp"] = summary[v]["peak_growth_mb"] / ref
        print(f"{v:34s} {summary[v]['peak_growth_mb']:8.0f} MB  {summary[v]['ratio_to_ddp']:.2f}x ddp  "
              f"(state held {summary[v]['state_local_mb']:.0f} MB)")
    report = {"config": cfg, "measure": "max over ranks of (VmHWM - VmRSS after init_distributed), median over rounds",
              "malloc_mmap_threshold": MMAP_THRESHOLD, "machine": C.machine(), "loadavg": loads, "summary": summary,
              "runs": runs, "target": "sharded in use <= 0.40x ddp; trainer sharded (steps and end) <= 0.40x trainer ddp"}
    if not args.quick:
        C.write_report("fsdp_memory", report, args.out)
    return report


if __name__ == "__main__":
    main()
