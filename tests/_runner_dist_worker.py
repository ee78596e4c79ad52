"""Worker for tests/test_runner_distributed.py: the runner under torchrun (or one process).

``python _runner_dist_worker.py OUT_DIR``: trains an MLP with a data-parallel step under
``functrain.run`` (Log, Jsonl, Evaluate, Checkpoint), stops at step 4 (a checkpoint is written
at the end), resumes from it in a second ``run`` to step 8, and writes the final params
(rank 0) to ``OUT_DIR/final.safetensors``.
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functrain as ft  # noqa: E402
from functrain import distributed as fd  # noqa: E402
from functrain.data.loader import ResumableLoader  # noqa: E402
from functrain.runner import Checkpoint, Evaluate, Jsonl, Log, StopWhen  # noqa: E402

GLOBAL_BATCH = 8


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = int(torch.randint(0, 4, (), generator=g))
        out.append({"x": torch.randn(8, generator=g), "labels": label if torch.rand((), generator=g) > 0.3 else -100})
    return out


def main(out_dir):
    from step_models import MLP

    torch.set_num_threads(1)
    fd.init_distributed()
    r, world = fd.rank(), fd.world_size()
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=15, classes=4)
    tx = ft.optim.adamw(1e-2, weight_decay=0.1)
    hooks = {}
    if world > 1:
        hooks = dict(zip(("grad_reduce", "count_reduce"), fd.data_parallel_hooks()))
    step = ft.make_train_step(model, tx, accumulate=2, **hooks)
    eval_step = ft.make_eval_step(model)
    train_rows, val_rows = rows(64, 1), rows(12, 2)
    val = ResumableLoader(val_rows, 2, shuffle=False, world_size=world, rank=r)

    def go(extra):
        state = ft.TrainState.create(model, tx, seed=0, copy=True)
        loader = ResumableLoader(train_rows, GLOBAL_BATCH // world, seed=3, world_size=world, rank=r)
        return ft.run(step, state, loader, steps=8, hooks=[
            Log(every=2), Jsonl(os.path.join(out_dir, "metrics.jsonl")), Evaluate(3, eval_step, val),
            Checkpoint(os.path.join(out_dir, "ck"), every=3), *extra])

    first = go([StopWhen(lambda run: run.step == 4, reason="test stop")])
    assert first.stop_reason == "test stop" and first.step == 4
    final = go([])
    if r == 0:
        save_file({k: v.contiguous() for k, v in final.state.params.items()},
                  os.path.join(out_dir, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
