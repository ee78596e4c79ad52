"""``report_to`` trackers: one table of names, and a thin callback on each tracker's own client.

Each callback follows the matching callback of ``transformers.integrations`` (same run names,
parameters, metric keys, steps and environment variables), written against the client directly
because transformers is not a dependency of functrain and its callbacks reach into transformers'
own Trainer (``WANDB_LOG_MODEL`` builds one). What is kept from HF, per tracker:

- ``mlflow``: params = model config + ``args.to_dict()``; metrics under their log keys (``loss``,
  ``eval_loss``...) at ``step=global_step``; ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``,
  ``MLFLOW_TAGS``, ``MLFLOW_NESTED_RUN``, ``MLFLOW_RUN_ID``, ``MLFLOW_FLATTEN_PARAMS``,
  ``MLFLOW_MAX_LOG_PARAMS``, ``HF_MLFLOW_LOG_ARTIFACTS``.
- ``wandb``: run ``name=args.run_name`` in ``WANDB_PROJECT`` (default ``huggingface``); config =
  model config + args; metrics as ``train/loss``, ``eval/loss``... with ``train/global_step`` as
  the x-axis; ``train_runtime``-style one-off values go to the run summary.
- ``trackio``: ``project=args.project``, ``name=args.run_name``, the same keys as wandb; local
  store only (no Space: functrain has no ``trackio_space_id``).
- ``comet_ml``: ``comet_ml.start`` with the experiment named ``args.run_name``; parameters
  ``args|...``, ``config|...`` (flattened); metrics as ``train/loss``, ``eval/loss``... at
  ``step=global_step`` with ``epoch``; ``COMET_MODE``, ``COMET_START_ONLINE`` (offline: an archive
  in ``COMET_OFFLINE_DIRECTORY``), ``COMET_PROJECT_NAME``, ``COMET_LOG_ASSETS``.
- ``clearml``: ``Task.init(project_name=$CLEARML_PROJECT or "HuggingFace Transformers",
  task_name=$CLEARML_TASK or "Trainer")`` (or the task already running); the arguments (no
  ``*_token``) as hyperparameters in section ``Transformers``, the model config as configuration
  object ``Model Configuration``; ``report_scalar(title="train"|"eval"|"test", series=key,
  iteration=global_step)``, one-off values with ``report_single_value``. Differs: checkpoints are
  not logged as models (``CLEARML_LOG_MODEL``; warned when set).

Where they differ from HF (see docs/trackers_and_hub.md): ``HF_MLFLOW_LOG_ARTIFACTS`` logs the
checkpoint files with ``mlflow.log_artifacts`` (HF: a pyfunc model); ``WANDB_LOG_MODEL`` and
``WANDB_WATCH`` are ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass

from functrain.trainer.callbacks import TrainerCallback
from functrain.trainer.logging import TensorBoardCallback

logger = logging.getLogger("functrain")

_TRUE = {"1", "ON", "YES", "TRUE"}

# Logged once at the end of training; HF puts them in the wandb run summary, not the history.
SINGLE_VALUE_SCALARS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                        "total_flos")

# transformers' report_to names that functrain does not drive (refused with a clear message).
HF_ONLY_INTEGRATIONS = ("azure_ml", "codecarbon", "dagshub", "dvclive", "flyte", "kubeflow", "neptune",
                        "swanlab")


def _env_true(name: str) -> bool:
    return os.getenv(name, "FALSE").upper() in _TRUE


def rewrite_logs(logs: dict) -> dict:
    """HF's key layout for wandb/trackio/tensorboard: ``eval_x`` -> ``eval/x``, ``test_x`` ->
    ``test/x``, anything else -> ``train/x``."""
    out = {}
    for k, v in logs.items():
        for prefix in ("eval_", "test_"):
            if k.startswith(prefix):
                out[f"{prefix[:-1]}/{k[len(prefix):]}"] = v
                break
        else:
            out[f"train/{k}"] = v
    return out


def run_params(args, model) -> dict:
    """What HF records as a run's parameters: the model config (if any), then the arguments."""
    params = dict(args.to_dict())
    config = getattr(model, "config", None)
    if config is not None:
        params = {**(config if isinstance(config, dict) else config.to_dict()), **params}
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        params = {"peft_config": peft_config, **params}
    return params


def _num_parameters(model) -> int | None:
    if model is None:
        return None
    if hasattr(model, "num_parameters"):
        return model.num_parameters()
    return sum(p.numel() for p in model.parameters())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class MLflowCallback(TrainerCallback):
    """Sends parameters and metrics to MLflow (the fluent API: ``mlflow.start_run``/``log_metrics``)."""

    def __init__(self):
        import mlflow

        self._ml_flow = mlflow
        self._initialized = False
        self._auto_end_run = False
        self._log_artifacts = False

    def setup(self, args, state, model):
        self._log_artifacts = _env_true("HF_MLFLOW_LOG_ARTIFACTS")
        nested = _env_true("MLFLOW_NESTED_RUN")
        run_id = os.getenv("MLFLOW_RUN_ID")
        mlflow = self._ml_flow
        if state.is_world_process_zero:
            uri = os.getenv("MLFLOW_TRACKING_URI")
            if not mlflow.is_tracking_uri_set() and uri:
                mlflow.set_tracking_uri(uri)
            if mlflow.active_run() is None or nested or run_id:
                experiment = os.getenv("MLFLOW_EXPERIMENT_NAME")
                if experiment:
                    mlflow.set_experiment(experiment)
                mlflow.start_run(run_name=args.run_name, nested=nested)  # MLFLOW_RUN_ID is read by mlflow
                self._auto_end_run = True
            self._log_params(run_params(args, model))
            tags = os.getenv("MLFLOW_TAGS")
            if tags:
                mlflow.set_tags(json.loads(tags))
        self._initialized = True

    def _log_params(self, params: dict) -> None:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if _env_true("MLFLOW_FLATTEN_PARAMS"):
            params = _flatten(params)
        for name, value in list(params.items()):
            if len(str(value)) > MAX_PARAM_VAL_LENGTH:
                logger.warning("mlflow: dropped parameter %r: its value is longer than MLflow's %d characters "
                               "(MLFLOW_FLATTEN_PARAMS=1 splits dicts)", name, MAX_PARAM_VAL_LENGTH)
                del params[name]
        items = list(params.items())
        limit = os.getenv("MLFLOW_MAX_LOG_PARAMS")
        if limit and limit.isdigit():
            items = items[: int(limit)]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._ml_flow.log_params(dict(items[i: i + MAX_PARAMS_TAGS_PER_BATCH]), synchronous=False)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        for k, v in logs.items():
            if isinstance(v, (int, float)):
                metrics[re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", k)] = v
            else:
                logger.warning("mlflow: dropped %r=%r: log_metric() takes only int and float", k, v)
        self._ml_flow.log_metrics(metrics=metrics, step=state.global_step, synchronous=False)

    def on_save(self, args, state, control, **kwargs):
        if self._initialized and state.is_world_process_zero and self._log_artifacts:
            ckpt_dir = f"checkpoint-{state.global_step}"
            self._ml_flow.log_artifacts(os.path.join(args.output_dir, ckpt_dir), artifact_path=ckpt_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if self._initialized and state.is_world_process_zero and self._auto_end_run and self._ml_flow.active_run():
            self._ml_flow.end_run()
            self._auto_end_run = False


class _StepKeyedTracker(TrainerCallback):
    """wandb and trackio: ``train/...`` keys and ``train/global_step`` logged with every row."""

    def __init__(self):
        self._initialized = False

    def setup(self, args, state, model):
        raise NotImplementedError

    def _log(self, row: dict) -> None:
        raise NotImplementedError

    def _summary(self, key, value) -> None:
        pass

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero or not logs:
            return
        for k in SINGLE_VALUE_SCALARS:
            if k in logs:
                self._summary(k, logs[k])
        rest = {k: v for k, v in logs.items() if k not in SINGLE_VALUE_SCALARS}
        self._log({**rewrite_logs(rest), "train/global_step": state.global_step})

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, kwargs.get("model"))
        if state.is_world_process_zero and metrics:
            self._log(rewrite_logs(metrics))


class WandbCallback(_StepKeyedTracker):
    """Logs to Weights & Biases (``WANDB_MODE=offline`` writes the run to ``WANDB_DIR`` only)."""

    def __init__(self):
        import wandb

        super().__init__()
        self._wandb = wandb
        for var, off in (("WANDB_LOG_MODEL", "false"), ("WANDB_WATCH", "false")):
            if os.getenv(var, off).lower() not in (off, ""):
                logger.warning("%s=%s is not supported by functrain's WandbCallback and is ignored: the pure "
                               "step updates parameters outside the module (no gradient hooks), and checkpoints "
                               "can be logged with wandb.Artifact(...).add_dir(checkpoint) in a callback",
                               var, os.getenv(var))

    def setup(self, args, state, model):
        self._initialized = True
        if not state.is_world_process_zero:
            return
        wandb = self._wandb
        init_args = {"name": args.run_name}
        if state.trial_name is not None:
            init_args = {"name": state.trial_name, "group": args.run_name or args.output_dir}
        if wandb.run is None:
            wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), **init_args)
        wandb.config.update(run_params(args, model), allow_val_change=True)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        n = _num_parameters(model)
        if n is not None:
            wandb.config["model/num_parameters"] = n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_hyper_param_search and self._initialized:  # one run per trial, as HF
            self._wandb.finish()
            self._initialized = False
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _log(self, row):
        self._wandb.log(row)

    def _summary(self, key, value):
        self._wandb.run.summary[key] = value

    # As HF, the run stays open after train() (predict() logs into it); wandb.finish() or the
    # end of the process closes it.



class TrackioCallback(_StepKeyedTracker):
    """Logs to trackio's local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``)."""

    def __init__(self):
        import trackio

        super().__init__()
        self._trackio = trackio

    def setup(self, args, state, model):
        if state.is_world_process_zero:
            params = run_params(args, model)
            n = _num_parameters(model)
            if n is not None:
                params["model/num_parameters"] = n
            self._trackio.init(project=args.project, name=args.run_name, resume="allow",
                               private=args.hub_private_repo, config=params)
        self._initialized = True

    def _log(self, row):
        self._trackio.log(row)

    def on_train_end(self, args, state, control, **kwargs):
        if self._initialized and state.is_world_process_zero:
            try:
                self._trackio.finish()
            finally:
                self._initialized = False


class CometCallback(TrainerCallback):
    """Logs to Comet (``COMET_START_ONLINE=false``: an offline archive, no account needed)."""

    def __init__(self):
        import comet_ml

        self._comet = comet_ml
        self._initialized = False
        self._log_assets = False
        self._experiment = None

    def setup(self, args, state, model):
        self._initialized = True
        self._log_assets = _env_true("COMET_LOG_ASSETS")
        if not state.is_world_process_zero:
            return
        mode = (os.getenv("COMET_MODE") or "").lower() or None
        if mode not in (None, "get", "get_or_create", "create"):
            logger.warning("comet_ml: COMET_MODE=%r is not one of get, get_or_create, create: Comet logging is "
                           "disabled for this run", mode)
            return
        if state.is_hyper_param_search:  # one experiment per trial, as HF
            mode = "create"
        comet = self._comet
        self._experiment = comet.start(mode=mode, experiment_config=comet.ExperimentConfig(name=args.run_name))
        self._experiment.__internal_api__set_model_graph__(model, framework="functrain")
        params = {"args": args.to_dict()}
        config = getattr(model, "config", None)
        if config is not None:
            params["config"] = config if isinstance(config, dict) else config.to_dict()
        if getattr(model, "peft_config", None) is not None:
            params["peft_config"] = model.peft_config
        self._experiment.__internal_api__log_parameters__(params, framework="functrain", source="manual",
                                                          flatten_nested=True)
        if state.is_hyper_param_search:
            self._experiment.log_optimization(optimization_id=state.trial_name, parameters=state.trial_params)

    def _log(self, state, logs) -> None:
        if state.is_world_process_zero and self._experiment is not None and logs:
            self._experiment.__internal_api__log_metrics__(rewrite_logs(logs), step=state.global_step,
                                                           epoch=state.epoch, framework="functrain")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        self._log(state, logs)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, kwargs.get("model"))
        self._log(state, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if not (self._initialized and state.is_world_process_zero and self._experiment is not None):
            return
        if self._log_assets:
            self._experiment.log_asset_folder(args.output_dir, recursive=True, log_file_name=True,
                                              step=state.global_step)
        if state.is_hyper_param_search:
            self._experiment.clean()
            self._initialized = False
    # As HF, the experiment stays open after train(); comet_ml.end() or the process's exit ends it.


class ClearMLCallback(TrainerCallback):
    """Logs to ClearML (``CLEARML_OFFLINE_MODE=1``: a local session folder, no server needed)."""

    HPARAMS_SECTION = "Transformers"
    MODEL_CONFIG_SECTION = "Model Configuration"
    SINGLE_VALUES = (*SINGLE_VALUE_SCALARS, "epoch")  # report_single_value, as HF

    def __init__(self):
        import clearml

        self._clearml = clearml
        self._task = None
        self._close_on_train_end = False
        if _env_true("CLEARML_LOG_MODEL"):
            logger.warning("CLEARML_LOG_MODEL is not supported by functrain's ClearMLCallback and is ignored: "
                           "checkpoints are not logged as ClearML models (log checkpoint-N/ with "
                           "OutputModel.update_weights_package in a callback)")

    def setup(self, args, state, model):
        if not state.is_world_process_zero:
            return
        Task = self._clearml.Task
        self._task = Task.current_task()
        if self._task is None:  # else: a task started outside (a pipeline, the user's script) is kept open
            self._task = Task.init(project_name=os.getenv("CLEARML_PROJECT", "HuggingFace Transformers"),
                                   task_name=os.getenv("CLEARML_TASK", "Trainer"),
                                   auto_connect_frameworks={"tensorboard": False, "pytorch": False}, output_uri=True)
            self._close_on_train_end = True
        hparams = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                   if f.init and not f.name.endswith("_token")}
        flat = self._clearml.utilities.proxy_object.flatten_dictionary(hparams)
        self._task.set_parameters({f"{self.HPARAMS_SECTION}/{k}": v for k, v in flat.items()})
        config = getattr(model, "config", None)
        if config is not None:
            self._task.set_configuration_object(
                name=self.MODEL_CONFIG_SECTION, config_dict=config if isinstance(config, dict) else config.to_dict())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._task is None:
            self.setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._task is None:
            self.setup(args, state, model)
        if not state.is_world_process_zero or not logs:
            return
        report = self._task.get_logger()
        for k, v in logs.items():
            if not isinstance(v, (int, float)):
                logger.warning("clearml: dropped %r=%r: report_scalar() takes only int and float", k, v)
            elif k in self.SINGLE_VALUES:
                report.report_single_value(name=k, value=v)
            else:
                title, series = next(((p[:-1], k[len(p):]) for p in ("eval_", "test_") if k.startswith(p)),
                                     ("train", k))
                report.report_scalar(title=title, series=series, value=v, iteration=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._task is not None and self._close_on_train_end:
            self._task.close()
            self._task, self._close_on_train_end = None, False


@dataclass(frozen=True)
class Integration:
    package: str  # the import name that must be installed
    callback: type


# The one table of report_to names functrain drives.
INTEGRATIONS: dict[str, Integration] = {
    "tensorboard": Integration("tensorboard", TensorBoardCallback),
    "mlflow": Integration("mlflow", MLflowCallback),
    "wandb": Integration("wandb", WandbCallback),
    "trackio": Integration("trackio", TrackioCallback),
    "comet_ml": Integration("comet_ml", CometCallback),
    "clearml": Integration("clearml", ClearMLCallback),
}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(INTEGRATIONS[name].package) is not None


def resolve_report_to(value) -> list[str]:
    """``"none"``/None -> []; ``"all"`` -> the installed trackers (said once in the log); a name or a
    list of names -> checked, with a message naming what is wrong and what is accepted."""
    if value is None or value == "none" or value == ["none"]:
        return []
    if value == "all" or value == ["all"]:
        found = [n for n in INTEGRATIONS if is_installed(n)]
        missing = [n for n in INTEGRATIONS if n not in found]
        logger.warning("report_to='all': reporting to %s%s", found or "no tracker (none is installed)",
                       f"; not installed: {missing}" if missing else "")
        return found
    names = [value] if isinstance(value, str) else list(value)
    for n in names:
        if n in HF_ONLY_INTEGRATIONS:
            raise ValueError(f"report_to={n!r} is a transformers integration functrain does not drive; supported: "
                             f"{list(INTEGRATIONS)}, 'all' or 'none'. A TrainerCallback around its client works "
                             "(functrain callbacks take the same (args, state, control) as transformers')")
        if n not in INTEGRATIONS:
            raise ValueError(f"report_to={n!r} is not a known tracker; supported: {list(INTEGRATIONS)}, 'all' or "
                             "'none' (metrics always go to metrics.jsonl and trainer_state.json)")
        if not is_installed(n):
            raise ValueError(f"report_to includes {n!r} but its client package {INTEGRATIONS[n].package!r} is not "
                             f"installed: pip install 'functrain[{n}]' or {INTEGRATIONS[n].package}")
    return names


def integration_callbacks(names: list[str]) -> list[type]:
    return [INTEGRATIONS[n].callback for n in names]
