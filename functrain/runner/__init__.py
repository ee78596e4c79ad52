"""The one training loop for any pure step, and its hooks. See ``docs/runner.md``.

    import functrain as ft
    from functrain.runner import Checkpoint, Evaluate, Jsonl, Log, ProgressBar

    out = ft.run(train_step, state, loader, steps=1000, hooks=[
        Log(every=10), Jsonl("out/metrics.jsonl"), ProgressBar(),
        Evaluate(100, eval_step, val_batches), Checkpoint("out", every=200, keep=2)])
"""

from functrain.runner.hooks import (
    Checkpoint, Evaluate, Hook, Jsonl, Log, Print, Profile, ProgressBar, StopWhen, TensorBoard, every,
)
from functrain.runner.loop import Run, run

__all__ = ["Checkpoint", "Evaluate", "Hook", "Jsonl", "Log", "Print", "Profile", "ProgressBar", "Run", "StopWhen",
           "TensorBoard", "every", "run"]
