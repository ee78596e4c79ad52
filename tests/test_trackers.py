"""report_to trackers, read back through each tracker's own client: MLflow (local file store,
``MlflowClient``), W&B (offline run file, wandb's protobuf records) and trackio (its local SQLite
store), Comet (its offline archive's messages). Keys and steps must equal
``trainer.state.log_history``; MLflow and W&B are also compared with transformers' own
MLflowCallback / WandbCallback fed the same log history."""

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from glob import glob

import pytest

from functrain.trainer.args import TrainingArguments, TrainingArgumentsError
from functrain.trainer.integrations import SINGLE_VALUE_SCALARS, rewrite_logs
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model

# Checked without importing: trackio reads TRACKIO_DIR when imported (the fixture sets it first).
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("mlflow", "wandb", "trackio", "comet_ml")),
                                reason="the tracker clients are in the test extra")

RUN_NAME = "functrain-tracker-test"
_WANDB_INTERNAL = ("_step", "_runtime", "_timestamp", "_wandb/runtime")


def _args(out, **kw):
    base = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=2,
                eval_strategy="steps", eval_steps=3, save_strategy="no", disable_tqdm=True, seed=3,
                run_name=RUN_NAME)
    base.update(kw)
    return TrainingArguments(str(out), **base)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One training run reporting to mlflow, wandb, trackio and comet_ml at once."""
    root = tmp_path_factory.mktemp("trackers")
    project = f"functrain-test-{uuid.uuid4().hex[:8]}"
    env = dict(MLFLOW_TRACKING_URI=f"file://{root / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
               MLFLOW_EXPERIMENT_NAME="functrain-tests", WANDB_MODE="offline", WANDB_DIR=str(root),
               WANDB_PROJECT="functrain-tests", WANDB_SILENT="true", TRACKIO_DIR=str(root / "trackio"),
               COMET_START_ONLINE="false", COMET_OFFLINE_DIRECTORY=str(root / "comet"),
               COMET_PROJECT_NAME="functrain-tests")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        trainer = Trainer(model=make_model(), args=_args(root / "out", report_to=["mlflow", "wandb", "trackio", "comet_ml"],
                                                         project=project),
                          train_dataset=make_dataset(), eval_dataset=make_dataset(n=8, seed=5))
        trainer.train()
        trainer.predict_metrics = trainer.predict(make_dataset(n=8, seed=7)).metrics  # wandb and trackio log test/... metrics
        import comet_ml
        import wandb

        wandb.finish()  # as in HF the run stays open after train(); close it to read the files
        comet_ml.end()  # the same for Comet: ending it writes the offline archive
        yield root, project, trainer


def _rows(trainer):
    """(step, logs as the callbacks received them) for every log."""
    return [(row["step"], {k: v for k, v in row.items() if k != "step"}) for row in trainer.state.log_history]


def _step_keyed(trainer):
    """What HF's wandb/trackio callbacks log per row: train/eval keys plus train/global_step, then
    the predict() metrics as test/... (no step)."""
    out = []
    for step, logs in _rows(trainer):
        rest = {k: v for k, v in logs.items() if k not in SINGLE_VALUE_SCALARS}
        out.append({**rewrite_logs(rest), "train/global_step": step})
    return out + [rewrite_logs(trainer.predict_metrics)]


# -- MLflow ---------------------------------------------------------------------------------------

def _mlflow_run(root, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{root / 'mlruns'}")
    exp = client.get_experiment_by_name("functrain-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_mlflow_metrics_and_params_read_back(tracked):
    root, _, trainer = tracked
    client, run = _mlflow_run(root, RUN_NAME)
    assert run.info.status == "FINISHED"  # the run was ended at on_train_end
    keys = {k for _, logs in _rows(trainer) for k in logs}
    assert set(run.data.metrics) == keys
    for key in keys:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = [(step, logs[key]) for step, logs in _rows(trainer) if key in logs]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12), key
    params = run.data.params
    assert params["learning_rate"] == "0.05" and params["max_steps"] == "6" and params["run_name"] == RUN_NAME


def test_mlflow_matches_transformers_callback(tracked):
    """transformers' MLflowCallback, given our args and the same logs, records the same run."""
    from transformers.integrations import MLflowCallback as HFMLflowCallback
    from transformers.trainer_callback import TrainerControl, TrainerState

    root, _, trainer = tracked
    args = dataclasses.replace(trainer.args, run_name="hf-reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"file://{root / 'mlruns'}")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "functrain-tests")
        hf, state, control = HFMLflowCallback(), TrainerState(), TrainerControl()
        hf.on_train_begin(args, state, control, model=trainer.model)
        for step, logs in _rows(trainer):
            state.global_step = step
            hf.on_log(args, state, control, logs=logs, model=trainer.model)
        hf.on_train_end(args, state, control)
    client, ours = _mlflow_run(root, RUN_NAME)
    _, ref = _mlflow_run(root, "hf-reference")
    assert set(ours.data.metrics) == set(ref.data.metrics)
    for key in ref.data.metrics:
        assert (sorted((m.step, m.value) for m in client.get_metric_history(ours.info.run_id, key))
                == sorted((m.step, m.value) for m in client.get_metric_history(ref.info.run_id, key))), key
    differ = {k for k in ref.data.params if ours.data.params.get(k) != ref.data.params[k]}
    assert differ == {"run_name"} and set(ours.data.params) == set(ref.data.params)


# -- W&B ------------------------------------------------------------------------------------------

def _wandb_run_dir(root, name):
    import _wandb_offline

    names = {d: _wandb_offline.run_name(d) for d in glob(str(root / "wandb" / "offline-run-*"))}
    dirs = [d for d, n in names.items() if n == name]
    assert len(dirs) == 1, names
    return dirs[0]


def _wandb_history(run_dir):
    import _wandb_offline

    return [{k: v for k, v in row.items() if k not in _WANDB_INTERNAL} for row in _wandb_offline.history(run_dir)]


def test_wandb_offline_run_read_back(tracked):
    import _wandb_offline

    root, _, trainer = tracked
    run_dir = _wandb_run_dir(root, RUN_NAME)
    history = _wandb_history(run_dir)
    want = _step_keyed(trainer)
    want[-1]["train/global_step"] = trainer.state.global_step  # define_metric(step_sync=True) fills it in
    assert [set(r) for r in history] == [set(r) for r in want]
    for got, expected in zip(history, want):
        assert got == pytest.approx(expected, rel=1e-12)
    summary = _wandb_offline.summary(run_dir)
    final = trainer.state.log_history[-1]
    assert summary["train_runtime"] == final["train_runtime"] and summary["train_loss"] == pytest.approx(
        final["train_loss"])
    config = _wandb_offline.config(run_dir)
    assert config["learning_rate"] == 0.05 and config["run_name"] == RUN_NAME
    assert config["model/num_parameters"] == sum(p.numel() for p in trainer.model.parameters())


def test_wandb_matches_transformers_callback(tracked):
    """transformers' WandbCallback, given our args and the same logs, writes the same history."""
    import wandb
    from transformers.integrations import WandbCallback as HFWandbCallback
    from transformers.trainer_callback import TrainerControl, TrainerState

    root, _, trainer = tracked
    args = dataclasses.replace(trainer.args, run_name="hf-reference")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true").items():
            mp.setenv(k, v)
        hf, state, control = HFWandbCallback(), TrainerState(), TrainerControl()
        hf.on_train_begin(args, state, control, model=trainer.model)
        for step, logs in _rows(trainer):
            state.global_step = step
            hf.on_log(args, state, control, logs=logs, model=trainer.model)
        hf.on_predict(args, state, control, metrics=trainer.predict_metrics)
        ref_dir = os.path.dirname(wandb.run.dir)  # <run dir>/files
        wandb.finish()
    assert _wandb_history(_wandb_run_dir(root, RUN_NAME)) == _wandb_history(ref_dir)


# -- trackio --------------------------------------------------------------------------------------

def test_trackio_local_store_read_back(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    import trackio

    root, project, trainer = tracked
    trackio.finish()  # predict() logged into the reopened run: end it, as a script's exit does, to flush its rows
    assert (root / "trackio" / f"{project}.db").is_file()  # TRACKIO_DIR was honoured
    rows = [{k: v for k, v in r.items() if k not in ("timestamp", "step")}
            for r in SQLiteStorage.get_logs(project, RUN_NAME)]
    want = _step_keyed(trainer)
    assert [set(r) for r in rows] == [set(r) for r in want]
    for got, expected in zip(rows, want):
        assert got == pytest.approx(expected, rel=1e-12)


# -- Comet ----------------------------------------------------------------------------------------

def _comet_messages(root):
    """The messages of the one offline experiment archive (what ``comet upload`` would send)."""
    archive, = glob(str(root / "comet" / "*.zip"))
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").splitlines()]
    return experiment, messages


def test_comet_offline_archive_read_back(tracked):
    root, _, trainer = tracked
    experiment, messages = _comet_messages(root)
    assert experiment["project_name"] == "functrain-tests"  # COMET_PROJECT_NAME
    assert {"key": "Name", "value": RUN_NAME} in [{k: m["payload"].get(k) for k in ("key", "value")}
                                                  for m in messages if m["type"] == "log_other"]
    ours = ("train/", "eval/", "test/")  # comet adds its own sys.* metrics
    got = sorted((m["payload"]["metric"]["step"], m["payload"]["metric"]["metricName"],
                  m["payload"]["metric"]["metricValue"]) for m in messages
                 if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"].startswith(ours))
    want = [(step, k, v) for step, logs in _rows(trainer) for k, v in rewrite_logs(logs).items()]
    want += [(trainer.state.global_step, k, v) for k, v in rewrite_logs(trainer.predict_metrics).items()]
    assert got == sorted(want)
    params = [m["payload"].get("param") or m["payload"]["params"] for m in messages if m["type"] == "parameter_msg"]
    params = {p["paramName"]: p["paramValue"] for p in params if p["source"] == "manual"}
    assert params["args|learning_rate"] == 0.05 and params["args|run_name"] == RUN_NAME


# -- ClearML --------------------------------------------------------------------------------------

@pytest.mark.slow  # a child process: imports, compile and ClearML's session (~30 s on a loaded machine)
@pytest.mark.skipif(importlib.util.find_spec("clearml") is None, reason="clearml is in the test extra")
def test_clearml_offline_session_read_back(tmp_path):
    """The run goes in a child process (ClearML's Task.init hooks its process); its offline session
    folder holds the scalars (metrics.jsonl) and the task (task.json) ClearML would upload."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(tmp_path / "cache"),
           "HOME": str(tmp_path), "CLEARML_PROJECT": "functrain-tests", "CLEARML_TASK": RUN_NAME,
           "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")])}
    # Run from a copy outside the git checkout: ClearML analyses the script's repository and its
    # imports when the task closes, which takes minutes on a whole checkout.
    script = tmp_path / "run.py"
    shutil.copy(os.path.join(tests, "_clearml_run.py"), script)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path, check=True, timeout=600)
    session, = [p for p in glob(str(tmp_path / "cache" / "offline" / "offline-*")) if os.path.isdir(p)]
    with open(os.path.join(session, "task.json")) as f:
        task = json.load(f)
    with open(os.path.join(session, "metrics.jsonl")) as f:
        events = [e for line in f for e in json.loads(line)]
    history = json.load(open(out / "log_history.json"))

    assert task["name"] == RUN_NAME  # CLEARML_TASK
    hparams = task["hyperparams"]["Transformers"]
    assert hparams["learning_rate"]["value"] == "0.05" and "hub_token" not in hparams
    single = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos",
              "epoch")
    got = sorted((e["iter"], e["metric"], e["variant"], e["value"]) for e in events
                 if e["type"] == "training_stats_scalar" and e["metric"] != "Summary")
    want = sorted((row["step"], *(("eval", k[5:]) if k.startswith("eval_") else ("train", k)), v)
                  for row in history for k, v in row.items() if k != "step" and k not in single)
    assert got == want
    summary = {e["variant"]: e["value"] for e in events if e.get("metric") == "Summary"}
    assert summary["train_runtime"] == history[-1]["train_runtime"] and summary["epoch"] == history[-1]["epoch"]


# -- report_to resolution -------------------------------------------------------------------------

def test_unknown_and_unsupported_tracker_names_are_refused():
    with pytest.raises(TrainingArgumentsError, match="'nope' is not a known tracker; supported: "
                                                     r"\['tensorboard', 'mlflow', 'wandb', 'trackio', 'comet_ml', 'clearml'\]"):
        TrainingArguments("o", report_to=["mlflow", "nope"])
    with pytest.raises(TrainingArgumentsError, match="'dvclive' is a transformers integration functrain does "
                                                     "not drive"):
        TrainingArguments("o", report_to="dvclive")


def test_named_tracker_not_installed_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec now reports it missing
    with pytest.raises(TrainingArgumentsError, match=r"'mlflow' .*not installed: pip install 'functrain\[mlflow\]'"):
        TrainingArguments("o", report_to="mlflow")


def test_report_to_all_with_no_tracker_installed_trains_and_says_so_once(tmp_path, monkeypatch, caplog):
    for package in ("tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "clearml"):
        monkeypatch.setitem(sys.modules, package, None)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        trainer = Trainer(model=make_model(), args=_args(tmp_path, report_to="all", eval_strategy="no", max_steps=2),
                          train_dataset=make_dataset())
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "report_to='all'" in r.getMessage()]
    assert said == ["report_to='all': reporting to no tracker (none is installed); not installed: "
                    "['tensorboard', 'mlflow', 'wandb', 'trackio', 'comet_ml', 'clearml']"]
    assert trainer.args.report_to == [] and trainer.state.global_step == 2
    assert (tmp_path / "metrics.jsonl").is_file()


def test_hub_token_is_masked_in_saved_arguments(tmp_path):
    args = TrainingArguments(str(tmp_path), hub_token="hf_secret")
    assert args.to_dict()["hub_token"] == "<HUB_TOKEN>" and "hf_secret" not in args.to_json_string()
    assert args.hub_token == "hf_secret"


def test_mlflow_logs_checkpoints_as_artifacts_with_hf_mlflow_log_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    for k, v in dict(MLFLOW_TRACKING_URI=f"file://{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
                     HF_MLFLOW_LOG_ARTIFACTS="1", MLFLOW_EXPERIMENT_NAME="artifacts").items():
        monkeypatch.setenv(k, v)
    trainer = Trainer(model=make_model(), args=_args(tmp_path / "out", report_to="mlflow", eval_strategy="no",
                                                     max_steps=2, save_strategy="steps", save_steps=2),
                      train_dataset=make_dataset())
    trainer.train()
    client = MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    run, = client.search_runs([client.get_experiment_by_name("artifacts").experiment_id])
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "checkpoint-2"))
    assert logged == sorted(f"checkpoint-2/{f.name}" for f in (tmp_path / "out" / "checkpoint-2").iterdir())
