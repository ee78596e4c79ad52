"""Where logs go: ``metrics.jsonl`` in the output folder (always) and TensorBoard (``report_to``;
the other trackers are in :mod:`functrain.trainer.integrations`).

Both are callbacks reacting to ``on_log``; the Trainer reads metric tensors on logging steps only,
so nothing here forces a host sync.
"""

from __future__ import annotations

import json
import math
import os

from functrain.trainer.callbacks import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class MetricsFileCallback(TrainerCallback):
    """Appends every log (with ``step`` and ``epoch``) as one JSON line to ``output_dir/metrics.jsonl``.

    On a resumed run, lines written after the checkpoint's step by the interrupted run are dropped
    first, so the file reads as one uninterrupted history.
    """

    def __init__(self):
        self.path = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.path = os.path.join(args.output_dir, METRICS_FILE)
        if state.global_step > 0 and os.path.isfile(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if row.get("step", 0) <= state.global_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = self.path or os.path.join(args.output_dir, METRICS_FILE)
        row = {k: _jsonable(v) for k, v in logs.items()}
        row.setdefault("step", state.global_step)
        if state.epoch is not None:
            row.setdefault("epoch", state.epoch)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class TensorBoardCallback(TrainerCallback):
    """Writes scalars to TensorBoard event files in ``args.logging_dir`` (HF tag names:
    ``train/loss``, ``eval/loss``, ...)."""

    def __init__(self, tb_writer=None):
        self.tb_writer = tb_writer

    def _writer(self, args):
        if self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(log_dir=args.logging_dir)
        return self.tb_writer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._writer(args).add_text("args", json.dumps(args.to_dict(), indent=2, default=str))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        w = self._writer(args)
        for k, v in logs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            for prefix in ("eval_", "test_"):
                if k.startswith(prefix):
                    tag = f"{prefix[:-1]}/{k[len(prefix):]}"
                    break
            else:
                tag = f"train/{k}"
            w.add_scalar(tag, v, state.global_step)
        w.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None

