"""Checkpoint folders ``output_dir/checkpoint-{step}/``: atomic, checksummed, pickle-free.

A checkpoint holds

- ``model.safetensors`` (+ ``config.json`` ...): the weights under the names the model's
  ``state_dict`` uses, written by ``save_pretrained`` for transformers models (tied weights once),
  so ``AutoModel...from_pretrained(folder)`` loads it; for a ``peft.PeftModel``, the adapter only
  (``adapter_config.json``, ``adapter_model.safetensors``), as transformers writes it: the frozen
  base is in neither file and comes back from the model on resume;
- ``train_state.safetensors``: every other leaf of the :class:`~functrain.TrainState` (optimizer
  state, step, rng key, loss scale, extras, and any param the model file lacks), keyed by its
  pytree path (:func:`functrain.tree.paths`);
- ``rng_state.safetensors``: the global torch / numpy / Python generators;
- ``trainer_state.json``, ``training_args.json``;
- ``manifest.json``: size and sha256 of every file above, written last.

It is written into a temporary folder next to its final place, every file and the folder are
fsynced, then the folder is renamed: a crash leaves either the whole checkpoint or none.
Loading verifies the manifest first and only ever parses safetensors and JSON; files that look like
pickles (``optimizer.pt``, ``*.bin``, ``*.pkl`` ...) are reported and ignored, never opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import uuid
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from functrain.core import tree

logger = logging.getLogger("functrain")

PREFIX = "checkpoint"
MODEL_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "train_state.safetensors"
RNG_FILE = "rng_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
ARGS_FILE = "training_args.json"
MANIFEST_FILE = "manifest.json"
BUFFERS_KEY = "buffers"  # train_state metadata: "from_model" when buffers are not in the file (PEFT)
SHARDED_LAYOUT_FILE = "train_state_layout.json"  # see functrain.parallel.checkpoint
FORMAT = "functrain.checkpoint"
VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message says which file and why."""


# -- listing ----------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}-{step}")


# -- writing ----------------------------------------------------------------------------------------


def save_checkpoint(output_dir: str, step: int, *, model, train_state=None, trainer_state=None, args=None,
                    processing_class=None, save_rng: bool = True) -> str:
    """Write ``output_dir/checkpoint-{step}`` atomically and return its path.

    ``model`` must already hold the weights to save (the Trainer copies the state's params into it
    first). With ``train_state=None`` only the model is saved (``save_only_model``): the folder is
    then not resumable.
    """

    def write_files(tmp: str) -> None:
        written = write_model(model, tmp, processing_class=processing_class)
        if train_state is not None:
            write_train_state(train_state, model, tmp, model_keys=written)
            if save_rng:
                write_rng_state(tmp)
        if trainer_state is not None:
            trainer_state.save_to_json(os.path.join(tmp, TRAINER_STATE_FILE))
        if args is not None:
            args.save_to_json(os.path.join(tmp, ARGS_FILE))

    return write_checkpoint(output_dir, step, write_files, resumable=train_state is not None)


def save_tree_checkpoint(output_dir: str, step: int, state, progress: dict) -> str:
    """Write ``output_dir/checkpoint-{step}`` for any pytree of tensors (no model): every leaf in
    ``train_state.safetensors`` keyed by its path, the global generators, and ``progress`` (a
    JSON-able dict: step, data position, hook states) as ``trainer_state.json``. Atomic, as
    :func:`save_checkpoint`; :func:`load_tree` reads it back."""

    def write_files(tmp: str) -> None:
        write_train_state(state, None, tmp, model_keys=set())
        write_rng_state(tmp)
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(progress, f, indent=2, sort_keys=True)

    return write_checkpoint(output_dir, step, write_files, resumable=True)


def write_checkpoint(output_dir: str, step: int, write_files, *, resumable: bool) -> str:
    """The atomic part of every checkpoint: ``write_files(tmp)`` fills a temporary folder, then the
    manifest (sizes, sha256) is written last, everything is fsynced and the folder renamed to
    ``checkpoint-{step}``. A crash leaves the whole checkpoint or none."""
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    tmp = os.path.join(output_dir, f".tmp-{PREFIX}-{step}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        write_files(tmp)
        write_manifest(tmp, step=step, resumable=resumable)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(output_dir)
    return final


def _replace_dir(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    if os.path.exists(dst):
        trash = os.path.join(os.path.dirname(dst), f".trash-{os.path.basename(dst)}-{uuid.uuid4().hex[:8]}")
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete ``.tmp-checkpoint-*`` / ``.trash-*`` folders a crash left behind."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith((f".tmp-{PREFIX}-", f".trash-{PREFIX}-")):
            logger.warning("removing %s, left behind by an interrupted checkpoint write", name)
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def write_model(model, folder: str, *, processing_class=None) -> set[str]:
    """Save the model's weights (and config, tokenizer) into ``folder``; return the tensor names written."""
    os.makedirs(folder, exist_ok=True)
    adapter_only = saves_adapter_only(model)
    if adapter_only or _is_pretrained(model):
        model.save_pretrained(folder)
    else:
        save_file(_dedup_state_dict(model.state_dict()), os.path.join(folder, MODEL_FILE), metadata={"format": "pt"})
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(folder)
    for name in os.listdir(folder):
        _fsync_file(os.path.join(folder, name))
    return set() if adapter_only else set(_weights_index(folder))


def saves_adapter_only(model) -> bool:
    """True for a ``peft.PeftModel``, whose ``save_pretrained`` writes the adapter, not the base.

    Duck-typed (``peft_config`` + ``save_pretrained``): io sits below ``functrain.adapters`` and
    imports neither it nor peft.
    """
    return hasattr(model, "peft_config") and hasattr(model, "save_pretrained") and hasattr(model, "get_base_model")


def _is_pretrained(model) -> bool:
    # A PreTrainedModel exists only if transformers was imported already; importing it here
    # would cost seconds (and transformers is optional).
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _dedup_state_dict(sd: dict) -> dict:
    """Keep one name per shared storage (tied weights), as ``save_pretrained`` does."""
    out, seen = {}, set()
    for name, t in sd.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        out[name] = t.detach().contiguous()
    return out


def write_train_state(state, model, folder: str, *, model_keys: set[str]) -> None:
    """Save every TrainState leaf not already in the model file, keyed by its pytree path.

    With ``model=None`` (any pytree of states, see :func:`save_tree_checkpoint`) every leaf is saved.
    For a PeftModel the buffers (the frozen base model) are not saved: they never change in
    training, the metadata says so, and loading takes them from the live model.
    """
    aliases = _alias_groups(model)
    buffers_from_model = saves_adapter_only(model)
    tensors = {}
    for path, leaf in tree.named_leaves(state).items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"state leaf {path!r} is a {type(leaf).__name__}; only tensors can be saved (keep scalars as 0-d tensors)")
        if _model_file_name(path, aliases, model_keys) is not None:
            continue
        if buffers_from_model and path.startswith("buffers."):
            continue
        tensors[path] = leaf.detach().contiguous().cpu()
    metadata = {"format": FORMAT, **({BUFFERS_KEY: "from_model"} if buffers_from_model else {})}
    save_file(tensors, os.path.join(folder, STATE_FILE), metadata=metadata)
    _fsync_file(os.path.join(folder, STATE_FILE))


def _alias_groups(model) -> dict[str, list[str]]:
    """``{name: [every name of the same tensor]}`` for params and buffers (tied weights)."""
    if model is None:
        return {}
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _model_file_name(path: str, aliases: dict, model_keys: set[str]) -> str | None:
    """The model-file key holding the state leaf at ``path`` ("params.x.weight"), or None."""
    for prefix in ("params.", "buffers."):
        if path.startswith(prefix):
            name = path[len(prefix):]
            for alias in aliases.get(name, [name]):
                if alias in model_keys:
                    return alias
    return None


def write_rng_state(folder: str) -> None:
    """The global generators (torch CPU/CUDA, numpy, Python ``random``) as tensors."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "python_state": torch.tensor(py_internal, dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    metadata = {
        "numpy_pos": str(int(np_state[2])), "numpy_has_gauss": str(int(np_state[3])),
        "numpy_cached_gaussian": repr(float(np_state[4])), "python_version": str(py_version),
        "python_gauss": "" if py_gauss is None else repr(float(py_gauss)),
    }
    save_file(tensors, os.path.join(folder, RNG_FILE), metadata=metadata)
    _fsync_file(os.path.join(folder, RNG_FILE))


def write_manifest(folder: str, *, step: int, resumable: bool) -> None:
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            files[rel] = {"sha256": _sha256(full), "bytes": os.path.getsize(full)}
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "resumable": resumable, "files": files}
    path = os.path.join(folder, MANIFEST_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- verifying --------------------------------------------------------------------------------------


def verify_checkpoint(path: str, *, require_resumable: bool = True) -> dict:
    """Check a checkpoint folder against its manifest; return the manifest or raise CheckpointError.

    Pickle-looking files are reported with a warning and ignored (never opened).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a folder")
    warn_about_pickles(path)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST_FILE}: it is incomplete (an interrupted "
                              "write) or was not written by functrain")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST_FILE} is unreadable or malformed ({e})") from None
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path!r} is missing {rel!r} (listed in its manifest)")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path!r}: {rel!r} has {size} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated or overwritten)")
        if _sha256(full) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path!r}: {rel!r} fails its sha256 check (corrupted)")
    if require_resumable:
        if not manifest.get("resumable"):
            raise CheckpointError(f"checkpoint {path!r} holds only the model (save_only_model=True); "
                                  "it cannot be resumed from")
        # A sharded checkpoint (functrain.parallel.checkpoint) has per-rank files + a layout instead.
        for needed in (STATE_FILE if SHARDED_LAYOUT_FILE not in files else SHARDED_LAYOUT_FILE, TRAINER_STATE_FILE):
            if needed not in files:
                raise CheckpointError(f"checkpoint {path!r} has no {needed!r}; it cannot be resumed from")
    return manifest


def warn_about_pickles(path: str) -> list[str]:
    found = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            if name.endswith(PICKLE_SUFFIXES):
                rel = os.path.relpath(os.path.join(root, name), path)
                found.append(rel)
                logger.warning("checkpoint %s: ignoring %s; functrain never loads pickle files "
                               "(loading one can run arbitrary code)", path, rel)
    return found


def find_resumable_checkpoint(output_dir: str) -> str | None:
    """The newest complete, valid checkpoint in ``output_dir`` (bad ones skipped with a warning)."""
    for step, path in reversed(checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping %s: %s", os.path.basename(path), e)
            continue
        logger.info("resuming from %s (step %d), the newest valid checkpoint", path, step)
        return path
    return None


# -- loading ----------------------------------------------------------------------------------------


def _weights_index(folder: str) -> dict[str, str]:
    """``{tensor name: file}`` for the model weights (single file or sharded with an index)."""
    index_path = os.path.join(folder, MODEL_INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(single):
        raise CheckpointError(f"{folder!r} has no {MODEL_FILE} (nor {MODEL_INDEX_FILE})")
    with _open_safetensors(single) as f:
        return {k: MODEL_FILE for k in f.keys()}


def _open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path!r} is not a readable safetensors file ({e})") from None


def _read_tensors(folder: str, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read ``{key: tensor}`` for ``wanted = {key: filename}``, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for k, fname in wanted.items():
        by_file.setdefault(fname, []).append(k)
    out = {}
    for fname, keys in by_file.items():
        with _open_safetensors(os.path.join(folder, fname)) as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out


def load_train_state(folder: str, template, model):
    """Rebuild a TrainState from ``folder`` shaped exactly like ``template`` (a fresh state).

    The template gives the tree structure (so NamedTuple types come back exactly), and each
    leaf's shape, dtype and device; a mismatch is a clear error naming the leaf. With
    ``model=None`` every leaf comes from ``train_state.safetensors`` (any pytree, no model file).
    """
    with _open_safetensors(os.path.join(folder, STATE_FILE)) as f:
        state_keys = set(f.keys())
        buffers_from_model = (f.metadata() or {}).get(BUFFERS_KEY) == "from_model"
    # An adapter checkpoint, or a tree checkpoint (model=None): no model file.
    model_index = {} if buffers_from_model or model is None else _weights_index(folder)
    aliases = _alias_groups(model)
    wanted_model, wanted_state = {}, {}
    paths = tree.paths(template)
    for path in paths:
        if path in state_keys:
            wanted_state[path] = STATE_FILE
        elif buffers_from_model and path.startswith("buffers."):
            continue  # the frozen base: the template's own tensor (the live model's)
        else:
            name = _model_file_name(path, aliases, set(model_index))
            if name is None:
                raise CheckpointError(f"checkpoint {folder!r} has no tensor for {path!r} (neither in {STATE_FILE} "
                                      "nor in the model weights); was it written for a different model or optimizer?")
            wanted_model[path] = name
    from_state = _read_tensors(folder, wanted_state)
    from_model = _read_tensors(folder, {name: model_index[name] for name in wanted_model.values()})
    leaves = []
    for path, ref in zip(paths, tree.leaves(template)):
        if path not in from_state and path not in wanted_model:
            leaves.append(ref)
            continue
        t = from_state[path] if path in from_state else from_model[wanted_model[path]]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {folder!r}: {path!r} is {t.dtype}{list(t.shape)}, the current "
                                  f"state expects {ref.dtype}{list(ref.shape)}")
        leaves.append(t.to(ref.device))
    _, treedef = tree.flatten(template)
    return tree.unflatten(treedef, leaves)


def load_model_weights(model, folder: str) -> None:
    """Copy the weights in ``folder`` into ``model`` (tied aliases may be absent from the file)."""
    index = _weights_index(folder)
    tensors = _read_tensors(folder, index)
    aliases = _alias_groups(model)
    own = dict(model.state_dict(keep_vars=True))
    missing = [n for n in own if not any(a in tensors for a in aliases.get(n, [n]))]
    unexpected = [n for n in tensors if n not in own]
    if missing or unexpected:
        raise CheckpointError(f"weights in {folder!r} do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in own.items():
            src = next(tensors[a] for a in aliases.get(name, [name]) if a in tensors)
            target.copy_(src)


def load_rng_state(folder: str) -> None:
    """Restore the global generators saved by :func:`write_rng_state` (if the file exists)."""
    path = os.path.join(folder, RNG_FILE)
    if not os.path.isfile(path):
        return
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(t["torch_cpu"])
    cuda = sorted(k for k in t if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t[k] for k in cuda])
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                         int(meta["numpy_has_gauss"]), float(meta["numpy_cached_gaussian"])))
    gauss = meta.get("python_gauss", "")
    random.setstate((int(meta["python_version"]), tuple(int(v) for v in t["python_state"].tolist()),
                     None if gauss == "" else float(gauss)))


# -- rotation ---------------------------------------------------------------------------------------


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None = None) -> list[str]:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the best one; return deleted paths.

    The newest checkpoint is kept too (it is the one to resume from), so with ``save_total_limit=1``
    and a best checkpoint that is not the newest, two remain.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    ckpts = [p for _, p in checkpoint_dirs(output_dir)]
    if len(ckpts) <= save_total_limit:
        return []
    best = os.path.abspath(best_model_checkpoint) if best_model_checkpoint else None
    keep = set(ckpts[-save_total_limit:])
    if best is not None:
        best_path = next((p for p in ckpts if os.path.abspath(p) == best), None)
        if best_path is not None and best_path not in keep:
            keep.add(best_path)
            if save_total_limit > 1:  # make room: drop the oldest kept one that is not the newest
                keep.discard(sorted(keep - {best_path}, key=ckpts.index)[0])
    deleted = []
    for p in ckpts:
        if p not in keep:
            logger.info("deleting older checkpoint %s (save_total_limit=%d)", p, save_total_limit)
            _remove_dir(p)
            deleted.append(p)
    return deleted


def _remove_dir(path: str) -> None:
    # Rename first so a crash mid-delete never leaves a half-deleted "checkpoint-N".
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_tree(folder: str, template) -> tuple[Any, dict]:
    """``(state, progress)`` from a :func:`save_tree_checkpoint` folder, ``state`` shaped like
    ``template``; restores the global generators too. Verify the folder first."""
    state = load_train_state(folder, template, None)
    with open(os.path.join(folder, TRAINER_STATE_FILE), encoding="utf-8") as f:
        progress = json.load(f)
    load_rng_state(folder)
    return state, progress


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)
