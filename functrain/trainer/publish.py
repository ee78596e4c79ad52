"""What a run publishes, with transformers' Trainer names and behaviour: ``log_metrics`` /
``save_metrics`` (``{split}_results.json``, ``all_results.json``), ``create_model_card``
(README.md) and the Hub (``push_to_hub``, ``hub_strategy``...).

Hub pushes (``args.push_to_hub``), as HF:
- the repo (``hub_model_id``, default: the name of ``output_dir``) is created when the Trainer is;
- on each checkpoint save, unless ``hub_strategy="end"``: the model files are copied from the
  checkpoint into ``output_dir`` and ``output_dir`` is uploaded (without ``checkpoint-*`` and
  ``_*``); ``checkpoint`` also uploads the checkpoint as ``last-checkpoint/`` (resumable after a
  download), ``all_checkpoints`` as ``checkpoint-N/``;
- what a push sends is fixed when it is queued (staged, the checkpoint's files hard-linked): a
  later save or checkpoint rotation never changes a commit still waiting for its turn;
- while an upload is in flight, later saves are not pushed unless ``hub_always_push=True``;
- the end of ``train()`` waits for the last upload; ``push_to_hub()`` saves the model, writes
  the model card and uploads ``output_dir``.
A failed upload is a warning (see :mod:`functrain.io.hub`); training goes on, local files stay.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from functrain.io import checkpoint as ck
from functrain.io.hub import HubUploader, folder_files
from functrain.parallel import distributed as fd
from functrain.trainer import model_card

logger = logging.getLogger("functrain")

_IGNORE_IN_OUTPUT_DIR = ["_*", f"{ck.PREFIX}-*", ".tmp-*", ".trash-*"]
# Files that make output_dir a loadable model (copied from each pushed checkpoint).
_MODEL_FILES = ("config.json", "generation_config.json", ck.MODEL_FILE, ck.MODEL_INDEX_FILE,
                "adapter_config.json", "adapter_model.safetensors")


def metrics_format(metrics: dict) -> dict:
    """HF's human-readable values: runtimes as h:mm:ss.ss, floats rounded to 4 digits."""
    out = dict(metrics)
    for k, v in out.items():
        if "_mem_" in k:
            out[k] = f"{v >> 20}MB"
        elif "_runtime" in k:
            out[k] = _secs2timedelta(v)
        elif k == "total_flos":
            out[k] = f"{int(v) >> 30}GF"
        elif isinstance(v, float):
            out[k] = round(v, 4)
    return out


def _secs2timedelta(secs: float) -> str:
    import datetime

    msec = int(abs(secs - int(secs)) * 100)
    return f"{datetime.timedelta(seconds=int(secs))}.{msec:02d}"


class PublishMixin:
    """Trainer methods: metric summaries, the model card and Hub pushes."""

    hub_model_id: str | None = None
    _hub: HubUploader | None = None

    # -- metric summaries -------------------------------------------------------------------------
    def metrics_format(self, metrics: dict) -> dict:
        return metrics_format(metrics)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print ``metrics`` as HF does (``***** train metrics *****`` then ``key = value`` rows)."""
        if not fd.is_main_process():
            return
        print(f"***** {split} metrics *****")
        formatted = metrics_format(metrics)
        k_width = max(len(str(x)) for x in formatted)
        v_width = max(len(str(x)) for x in formatted.values())
        for key in sorted(formatted):
            print(f"  {key: <{k_width}} = {formatted[key]:>{v_width}}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Write ``{split}_results.json``; with ``combined``, merge into ``all_results.json`` too."""
        if not fd.is_main_process():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        _write_json(os.path.join(self.args.output_dir, f"{split}_results.json"), metrics)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    merged = json.load(f)
            merged.update(metrics)
            _write_json(path, merged)

    # -- model card -------------------------------------------------------------------------------
    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Write ``output_dir/README.md`` (HF's layout: results, hyperparameters, framework versions)."""
        if not fd.is_main_process():
            return
        config = getattr(self.model, "config", None)
        name_or_path = getattr(config, "_name_or_path", None)
        if finetuned_from is None and name_or_path and not os.path.isdir(name_or_path):
            finetuned_from = name_or_path
        model_name = model_name or Path(self.args.output_dir).name or finetuned_from
        text = model_card.model_card_text(
            args=self.args, log_history=self.state.log_history, model_name=model_name,
            world_size=fd.world_size(), language=language, license=license, tags=tags,
            finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset)
        model_card.write_model_card(self.args.output_dir, text)

    # -- the Hub ----------------------------------------------------------------------------------
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or reuse) the repo ``hub_model_id`` (default: the name of ``output_dir``)."""
        if not fd.is_main_process():
            return
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self._hub = HubUploader.create_repo(
            name, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo, revision=self.args.hub_revision,
            staging_root=self.args.output_dir)
        self.hub_model_id = self._hub.repo_id

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model, write the model card and upload ``output_dir`` (not the checkpoints)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None:
            model_name = (self.args.hub_model_id or "").split("/")[-1] or Path(self.args.output_dir).name
        if self._hub is None or token is not None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not fd.is_main_process():
            return None
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        if revision is not None:
            self._hub.revision = revision
        return self._hub.upload_folder(self.args.output_dir, commit_message=commit_message,
                                       ignore_patterns=list(_IGNORE_IN_OUTPUT_DIR), blocking=blocking)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Queue the upload of a checkpoint just saved (see the module docstring)."""
        a = self.args
        if not fd.is_main_process() or a.hub_strategy == "end" or self._hub is None:
            return
        if not a.hub_always_push and self._hub.busy():
            logger.info("not pushing %s: the previous upload is still running (hub_always_push=False)",
                        os.path.basename(checkpoint_folder))
            return
        self.callback_handler.on_push_begin(a, self.state, self.control)
        model_files = {name: os.path.join(checkpoint_folder, name) for name in _model_files(checkpoint_folder)}
        for name, src in model_files.items():  # output_dir stays a loadable model, as HF
            _replace_file(src, os.path.join(a.output_dir, name))
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(a.output_dir)
        a.save_to_json(os.path.join(a.output_dir, ck.ARGS_FILE))
        message = (f"Training in progress, step {self.state.global_step}" if a.save_strategy == "steps"
                   else f"Training in progress, epoch {int(self.state.epoch or 0)}")
        # The root commit takes its weights from the (immutable) checkpoint, not from output_dir's
        # copies, which the next save replaces: the upload is staged now (see io/hub.py).
        root = {**folder_files(a.output_dir, list(_IGNORE_IN_OUTPUT_DIR)), **model_files}
        self._hub.upload_files(root, commit_message=message, immutable=model_files.values())
        if a.hub_strategy in ("checkpoint", "all_checkpoints"):
            path_in_repo = "last-checkpoint" if a.hub_strategy == "checkpoint" else Path(checkpoint_folder).name
            self._hub.upload_folder(checkpoint_folder, path_in_repo=path_in_repo, immutable=True,
                                    commit_message=message + ", checkpoint")

    def _finish_current_push(self) -> None:
        """Wait for the uploads in flight (failures were logged, never raised)."""
        if self._hub is not None:
            self._hub.wait()


def _model_files(folder: str) -> list[str]:
    """The files of ``folder`` that make a loadable model: config, weights (and their shards)."""
    names = [n for n in _MODEL_FILES if os.path.isfile(os.path.join(folder, n))]
    index = os.path.join(folder, ck.MODEL_INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names += sorted(set(json.load(f)["weight_map"].values()))
    return names


def _replace_file(src: str, dst: str) -> None:
    """Copy then rename: ``output_dir`` never holds a torn file (for a reader, or after a crash)."""
    tmp = os.path.join(os.path.dirname(dst), f"_{os.path.basename(dst)}.tmp")  # "_*" is never uploaded
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4, sort_keys=True)
