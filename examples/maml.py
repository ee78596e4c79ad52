"""MAML (Finn et al. 2017) on sine regression: second-order meta-learning with torch.func.

    python examples/maml.py --steps 1000 --out runs/maml

Each task is a sine wave ``A sin(x + phase)``; the model sees K support points, takes
``inner_steps`` gradient steps on them (``adapt``), and is scored on query points of the same
task. The meta-gradient differentiates THROUGH the inner updates (second order:
``torch.func.grad`` of a function that calls ``torch.func.grad``), and the meta-update is
``state.apply_gradients``; the whole step is one pure function (compiled whole with ``--compile``).
``tests/test_recipes.py`` checks the meta-gradients and four meta-steps against the same
computation with plain autograd (``create_graph=True``) and ``torch.optim.Adam``.

What falls: ``eval_loss``, the query MSE after adaptation on 64 held-out tasks, from ~4.7
(untrained) to below 1.6 in 600 steps (seed 0); ``eval_loss_before`` (before adaptation) stays
near 3.5, as for a model that must adapt to each task. (Per batch, ``loss`` is noisy: 8 tasks.)
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

import functrain as ft
from functrain.runner import Checkpoint, Evaluate, Jsonl, Log, Print


def make_model(width: int = 40) -> nn.Module:
    return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def make_data(tasks: int = 8, k: int = 10, seed: int = 0):
    """Batch ``i``: ``tasks`` sine tasks with ``k`` support and ``k`` query points each, a pure
    function of ``(seed, i)``."""

    def data(i: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        amp = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=g)
        xs, xq = (torch.empty(tasks, k, 1).uniform_(-5.0, 5.0, generator=g) for _ in range(2))
        return {"xs": xs, "ys": amp * torch.sin(xs + phase), "xq": xq, "yq": amp * torch.sin(xq + phase)}

    return data


def build(seed: int = 0, lr: float = 3e-3, inner_lr: float = 0.01, inner_steps: int = 1,
          compile: bool | str = False):  # noqa: A002 - True or a torch.compile backend
    torch.manual_seed(seed)
    model = make_model()
    tx = ft.optim.adam(lr)
    state = ft.TrainState.create(model, tx, seed=seed, copy=True)

    def mse(params, x, y):
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def adapt(params, xs, ys):
        """``inner_steps`` of SGD on the support set; differentiable (no detach): second order."""
        for _ in range(inner_steps):
            g = grad(mse)(params, xs, ys)
            params = {k: p - inner_lr * g[k] for k, p in params.items()}
        return params

    def task_loss(params, xs, ys, xq, yq):
        return mse(adapt(params, xs, ys), xq, yq)

    def meta_loss(params, batch):
        losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, batch["xs"], batch["ys"], batch["xq"],
                                                            batch["yq"])
        return losses.mean()

    def loss_before(params, batch):
        return vmap(mse, in_dims=(None, 0, 0))(params, batch["xq"], batch["yq"]).mean()

    def maml_step(state, batch):
        meta_grads, loss = grad_and_value(meta_loss)(state.params, batch)
        metrics = {"loss": loss, "loss_before": loss_before(state.params, batch)}
        return state.apply_gradients(grads=meta_grads, tx=tx), metrics

    def eval_step(state, batch):
        """Query MSE after / before adaptation, on held-out tasks (no meta-update)."""
        return {"loss": meta_loss(state.params, batch).detach(), "loss_before": loss_before(state.params, batch)}

    step = ft.step.compile_step(maml_step, compile) if compile else maml_step
    return step, state, {"eval_step": eval_step, "meta_loss": meta_loss, "model": model, "tx": tx}


def main(argv=None) -> ft.runner.Run:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default="runs/maml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    step, state, parts = build(args.seed, compile=args.compile)
    held_out = [make_data(tasks=64, seed=args.seed + 99)(0)]
    return ft.run(step, state, make_data(seed=args.seed), steps=args.steps,
                  hooks=[Log(every=100), Evaluate(100, parts["eval_step"], held_out), Jsonl(f"{args.out}/metrics.jsonl"),
                         Print(), Checkpoint(args.out, every=250, keep=2)])


if __name__ == "__main__":
    main()
