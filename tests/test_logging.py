"""Where a Trainer run's logs go: TensorBoard (read back with TensorBoard's own reader), metrics.jsonl,
trainer_state.json, report_to resolution, and the progress bar's disable_tqdm."""

import json
import math
import sys
from pathlib import Path

import pytest

from functrain.trainer.trainer import Trainer
from functrain.trainer.args import TrainingArguments, TrainingArgumentsError

from _trainer_fixtures import make_dataset, make_model

pytest.importorskip("functrain.step")

MAX_STEPS, LOGGING_STEPS, EVAL_STEPS = 6, 2, 3


def _run(out, **kw):
    args = dict(max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=5e-2, warmup_steps=2,
                logging_steps=LOGGING_STEPS, eval_strategy="steps", eval_steps=EVAL_STEPS, save_strategy="steps",
                save_steps=MAX_STEPS, report_to="none", disable_tqdm=True, seed=3)
    args.update(kw)
    trainer = Trainer(model=make_model(), args=TrainingArguments(str(out), **args), train_dataset=make_dataset(),
                      eval_dataset=make_dataset(n=8, seed=5))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    return out, _run(out, report_to=["tensorboard"])


def _event_files(logging_dir):
    return sorted(Path(logging_dir).glob("**/events.out.tfevents.*"))


def test_tensorboard_scalars_read_back_with_tensorboards_reader(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, trainer = tb_run
    assert trainer.args.logging_dir == str(out / "runs")
    assert _event_files(out / "runs")
    acc = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/train_runtime"} <= tags

    history = trainer.state.log_history
    for tag, key, steps in [("train/loss", "loss", [2, 4, 6]), ("train/learning_rate", "learning_rate", [2, 4, 6]),
                            ("train/grad_norm", "grad_norm", [2, 4, 6]), ("eval/loss", "eval_loss", [3, 6])]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps, tag
        logged = [h[key] for h in history if key in h]
        assert [e.value for e in events] == pytest.approx(logged, rel=1e-6), tag  # float32 in the event file
    # The learning rate written is the one the logged step used (schedule count = step - 1): linear
    # warmup over 2 steps, then linear decay to 0 at MAX_STEPS.
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]
    assert lrs == pytest.approx([5e-2 * 1 / 2] + [5e-2 * (MAX_STEPS - c) / (MAX_STEPS - 2) for c in (3, 5)], rel=1e-6)


def test_metrics_jsonl_lines_parse_and_match_log_history(tb_run):
    out, trainer = tb_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == trainer.state.log_history
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"loss", "learning_rate", "grad_norm", "step", "epoch", "step_time", "samples_per_second"} <= set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["learning_rate"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert rows[-1]["step"] == MAX_STEPS and "train_runtime" in rows[-1]


def test_trainer_state_json_log_history_matches(tb_run):
    out, trainer = tb_run
    saved = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    # The checkpoint is written at the last step, before the end-of-training summary is logged.
    assert saved["global_step"] == MAX_STEPS
    assert saved["log_history"] == trainer.state.log_history[:-1]
    assert "train_runtime" in trainer.state.log_history[-1]


def test_report_to_none_writes_no_event_file(tmp_path):
    trainer = _run(tmp_path, report_to="none", save_strategy="no", eval_strategy="no", max_steps=2)
    assert trainer.args.report_to == []
    assert _event_files(tmp_path) == []
    assert (tmp_path / "metrics.jsonl").is_file()  # the JSONL log is always written


def test_report_to_all_enables_only_installed_integrations(monkeypatch):
    from functrain.trainer import integrations
    from functrain.trainer.callbacks import TrainerCallback

    monkeypatch.setitem(integrations.INTEGRATIONS, "fake_tracker",
                        integrations.Integration("functrain_no_such_package", TrainerCallback))
    assert TrainingArguments("o", report_to="all").report_to == ["tensorboard", "mlflow", "wandb", "trackio",
                                                                    "comet_ml", "clearml"]
    with pytest.raises(TrainingArgumentsError, match="fake_tracker.*not installed"):
        TrainingArguments("o", report_to=["fake_tracker"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec now reports it missing
    assert TrainingArguments("o", report_to="all").report_to == ["mlflow", "wandb", "trackio", "comet_ml", "clearml"]


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_disable_tqdm_is_respected(tmp_path, capfd, disable_tqdm):
    _run(tmp_path, disable_tqdm=disable_tqdm, save_strategy="no", max_steps=4)
    captured = capfd.readouterr()
    bar = f"{4}/{4}"  # tqdm's "n/total" counter
    if disable_tqdm:
        assert bar not in captured.err and "it/s" not in captured.err
        assert "'loss'" in captured.out  # the logs are printed instead
    else:
        assert bar in captured.err
