"""Worker for tests/test_streaming_resume.py's two-rank test (torchrun, gloo).

``python _stream_dist_worker.py OUT_DIR``: each rank reads its own share of a stream (a sharded
``datasets`` stream split by node; a torch stream dealt in blocks) and trains with a data-parallel
step, through the runner and through the Trainer: once uninterrupted, once stopped at step 4 and
resumed. Each rank writes ``result-{rank}.json``: whether the resumed state equals the
uninterrupted one bitwise, the data position the checkpoint saved, and the examples it read.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functrain as ft  # noqa: E402
from functrain import distributed as fd  # noqa: E402
from functrain.data import ResumableLoader  # noqa: E402
from functrain.runner import Checkpoint, StopWhen  # noqa: E402


def _stream(kind):
    from _streams import CountingStream, hf_stream, stream_rows

    rows = stream_rows(48)
    return hf_stream(rows) if kind == "hf" else CountingStream(rows)


def runner_case(out_dir, kind):
    from step_models import MLP

    r, world = fd.rank(), fd.world_size()
    ds = _stream(kind)

    def go(ck_dir, steps, extra=()):
        torch.manual_seed(0)
        model = MLP(d_in=8, hidden=16, classes=3, dropout=0.1)
        tx = ft.optim.adamw(1e-2)
        reduce = dict(zip(("grad_reduce", "count_reduce"), fd.data_parallel_hooks()))
        step = ft.make_train_step(model, tx, accumulate=2, **reduce)
        state = ft.TrainState.create(model, tx, seed=0, copy=True)
        loader = ResumableLoader(ds, 4, seed=3, world_size=world, rank=r, shard_block=2)
        hooks = [Checkpoint(ck_dir, every=3)] if ck_dir else []
        return ft.run(step, state, loader, steps=steps, hooks=[*hooks, *extra]).state

    ref = go(None, 8)
    reads_ref = getattr(ds, "reads", 0)
    ck_dir = os.path.join(out_dir, f"runner-{kind}")
    go(ck_dir, 8, [StopWhen(lambda run: run.step == 4)])
    reads_first = getattr(ds, "reads", 0) - reads_ref
    resumed = go(ck_dir, 8)
    with open(os.path.join(ck_dir, "checkpoint-4", "trainer_state.json")) as f:
        position = json.load(f)["data_position"]
    return {"equal": ft.tree.tensors_equal(resumed, ref), "position": position,
            "reads": [reads_ref, reads_first, getattr(ds, "reads", 0) - reads_ref - reads_first]}


class _StopAt(ft.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            control.should_training_stop = True


def trainer_case(out_dir, workers):
    from _trainer_fixtures import make_model, params_of

    def go(name, callbacks=(), resume=None):
        args = ft.TrainingArguments(os.path.join(out_dir, name), max_steps=8, per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2, learning_rate=5e-2, save_strategy="steps",
                                    save_steps=2, report_to="none", disable_tqdm=True, seed=3,
                                    dataloader_num_workers=workers)
        t = ft.Trainer(model=make_model(), args=args, train_dataset=_stream("hf"), callbacks=list(callbacks))
        t.train(resume_from_checkpoint=resume)
        return params_of(t)

    ref = go("trainer-ref")
    go(f"trainer-{workers}", [_StopAt()])
    resumed = go(f"trainer-{workers}", resume=True)
    with open(os.path.join(out_dir, f"trainer-{workers}", "checkpoint-4", "trainer_state.json")) as f:
        position = json.load(f)["data_position"]
    return {"equal": all(torch.equal(resumed[k], ref[k]) for k in ref), "position": position}


def main(out_dir):
    torch.set_num_threads(1)
    fd.init_distributed()
    result = {"world_size": fd.world_size(), "runner_hf": runner_case(out_dir, "hf"),
              "runner_torch": runner_case(out_dir, "torch"), "trainer": trainer_case(out_dir, 0)}
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
    fd.barrier()
    # As tests/_dist_worker.py: leave right after the final barrier (issue 14's teardown abort).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
