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
- ``manifest.json``: size and checksum of every file above, written last.

It is written into a temporary folder next to its final place, the manifest last, then the folder
is renamed: a process crash (exception, SIGKILL) leaves either the whole checkpoint or none. Each
file is hashed in a background thread while the next one is written: the safetensors files
functrain saves itself are hashed from the tensors in memory (no read-back of their data); files a
library writes (``save_pretrained``'s, the JSON files) from the page cache.

Durability is asynchronous: :func:`save_checkpoint` returns once the folder is renamed into place,
and the fsyncs (files, manifest, folder, parent folder) run in a background thread
(:class:`Durability`). Until they finish, a power cut or OS crash can leave the new folder with
torn files; resume verifies every byte against the manifest and falls back to the previous
checkpoint. So nothing deletes or replaces a checkpoint before the newer one is durable:
rotation, same-step replacement and ``overwrite_output_dir`` call :func:`wait_durable` first, as
do the end of ``Trainer.train()``, the runner's final checkpoint and process exit. A failed
background fsync is raised (as :class:`CheckpointError`) by the next save or wait.

The checksum is an integrity check, not a signature: xxh3_128 (checkpoints of manifest version 1
carry sha256, which is still read: each manifest entry names its algorithm). A cryptographic hash
would add no security, since the manifest sits in the folder it describes; what must be caught is
a torn, truncated or corrupted file.
Loading verifies the manifest first and only ever parses safetensors and JSON; files that look like
pickles (``optimizer.pt``, ``*.bin``, ``*.pkl`` ...) are reported and ignored, never opened.
:func:`read_checkpoint` reads each listed file once: its bytes are hashed and parsed from the same
buffer, so resuming reads the checkpoint once and loads exactly the bytes that were verified.

Nothing in a checkpoint is trusted for paths: a file is opened only if the (shape-checked) manifest
lists it under a plain relative name and it is a regular file inside the folder (no symlink, no
``..``, no absolute path); a weights index is read only if listed, and its shards must be listed too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import random
import re
import atexit
import shutil
import stat
import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from functrain.core import tree
from functrain.io import tensor_file

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
VERSION = 2  # 2: xxh3_128 checksums (1: sha256; both are read)
# The manifest's integrity checksums: {name: (constructor, hex digits)}. The manifest lives in the
# folder it checks, so a cryptographic hash would add no security: anyone who can change a file
# can rewrite its entry. What it must catch is a torn, truncated or bit-flipped file, which
# xxh3_128 does at memory speed (~30 GB/s on one core; sha256 runs at 0.3-0.8 GB/s).
CHECKSUMS = {"xxh3_128": (xxhash.xxh3_128, 32), "sha256": (hashlib.sha256, 64)}
CHECKSUM = "xxh3_128"  # what new checkpoints use
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message says which file and why."""


class OptimizerMismatchError(CheckpointError):
    """The checkpoint's optimizer state has another structure than this run's optimizer."""


# -- listing ----------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}-{step}")


# -- writing ----------------------------------------------------------------------------------------


def save_checkpoint(output_dir: str, step: int, *, model, train_state=None, trainer_state=None, args=None,
                    processing_class=None, save_rng: bool = True, model_state_dict=None,
                    durability: Durability | None = None) -> str:
    """Write ``output_dir/checkpoint-{step}`` atomically and return its path.

    ``model`` must already hold the weights to save (the Trainer copies the state's params into it
    first), or ``model_state_dict`` gives them (a sharded module's gathered weights). With
    ``train_state=None`` only the model is saved (``save_only_model``): the folder is then not
    resumable. It is durable once ``durability`` (default :data:`DURABILITY`) has finished its
    fsyncs: :func:`wait_durable`.
    """

    def write_files(tmp: str, written: WrittenFiles) -> None:
        if train_state is not None:
            # The optimizer state (most of the bytes) is written in a background thread while the
            # model file is: safetensors' write releases the GIL, so the two files are copied out in
            # parallel. Which params the model file holds is predicted, then checked below.
            predicted = expected_model_keys(model, model_state_dict)
            written.write_in_background(STATE_FILE, *train_state_tensors(train_state, model, model_keys=predicted))
        model_keys = write_model(model, tmp, processing_class=processing_class, written=written,
                                 state_dict=model_state_dict)
        if train_state is not None:
            if state_leaves_in_model(train_state, model, predicted) != state_leaves_in_model(train_state, model, model_keys):
                # save_pretrained wrote another set of weights than the state dict (its keys to ignore):
                # rewrite the state file with the params the model file lacks.
                written.wait(STATE_FILE)
                written.write_in_background(STATE_FILE, *train_state_tensors(train_state, model, model_keys=model_keys))
            if save_rng:
                write_rng_state(tmp, written=written)
        if trainer_state is not None:
            trainer_state.save_to_json(os.path.join(tmp, TRAINER_STATE_FILE))
        if args is not None:
            args.save_to_json(os.path.join(tmp, ARGS_FILE))

    return write_checkpoint(output_dir, step, write_files, resumable=train_state is not None, durability=durability)


def save_tree_checkpoint(output_dir: str, step: int, state, progress: dict, *,
                         durability: Durability | None = None) -> str:
    """Write ``output_dir/checkpoint-{step}`` for any pytree of tensors (no model): every leaf in
    ``train_state.safetensors`` keyed by its path, the global generators, and ``progress`` (a
    JSON-able dict: step, data position, hook states) as ``trainer_state.json``. Atomic, as
    :func:`save_checkpoint`; :func:`load_tree` reads it back."""

    def write_files(tmp: str, written: WrittenFiles) -> None:
        write_train_state(state, None, tmp, model_keys=set(), written=written)
        write_rng_state(tmp, written=written)
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(progress, f, indent=2, sort_keys=True)

    return write_checkpoint(output_dir, step, write_files, resumable=True, durability=durability)


def write_checkpoint(output_dir: str, step: int, write_files, *, resumable: bool,
                     durability: Durability | None = None) -> str:
    """The atomic part of every checkpoint: ``write_files(tmp, written)`` fills a temporary folder
    (handing each file to ``written``, which hashes it in the background while the next file is
    written), then the manifest (sizes, checksums) is written last and the folder renamed to
    ``checkpoint-{step}``: a process crash leaves the whole checkpoint or none. The fsyncs run in
    the background (``durability``, default :data:`DURABILITY`), except when an older folder of
    the same step is replaced: that one is deleted, so the new one is made durable first."""
    durability = durability or DURABILITY
    durability.raise_failure()  # an earlier save's background fsync failed: say so before writing more
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    replacing = os.path.exists(final)
    tmp = os.path.join(output_dir, f".tmp-{PREFIX}-{step}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        with WrittenFiles(tmp, fsync=replacing) as written:
            write_files(tmp, written)
            written.add_unlisted()  # the JSON files, written last
        write_manifest(tmp, step=step, resumable=resumable, known=written.entries, fsync=replacing)
        if replacing:
            fsync_dir(tmp)
            replace_dir(tmp, final)
            fsync_dir(output_dir)
            return final
        handles = open_for_fsync(tmp)
        try:
            os.rename(tmp, final)
        except BaseException:
            close_all(handles)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    durability.submit(final, handles + open_for_fsync(output_dir, directory=True))
    return final


def replace_dir(src: str, dst: str) -> None:
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


def write_model(model, folder: str, *, processing_class=None, written: WrittenFiles | None = None,
                state_dict: dict | None = None) -> set[str]:
    """Save the model's weights (and config, tokenizer) into ``folder``; return the tensor names written.

    ``written``: the checkpoint's :class:`WrittenFiles`, which hashes and fsyncs every file written
    here in the background (without it, each is fsynced before this returns). ``state_dict``: the
    weights to write instead of ``model.state_dict()`` (a sharded module's gathered full weights, as
    ``save_pretrained(state_dict=...)`` takes them).
    """
    os.makedirs(folder, exist_ok=True)
    adapter_only = saves_adapter_only(model)
    if adapter_only or _is_pretrained(model):
        model.save_pretrained(folder, state_dict=state_dict)
    else:
        sd = model.state_dict() if state_dict is None else state_dict
        write_safetensors(folder, MODEL_FILE, _dedup_state_dict(sd), {"format": "pt"}, written)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(folder)
    if written is None:
        for name in os.listdir(folder):
            fsync_file(os.path.join(folder, name))
    else:
        written.add_unlisted()  # save_pretrained's files: hashed from the page cache
    return set() if adapter_only else set(weights_index(folder))


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
    return {name: sd[name].detach().contiguous() for name in _unique_names(sd)}


def _unique_names(sd: dict) -> list[str]:
    """The names of ``sd`` with one name per shared storage (the first), in order."""
    out, seen = [], set()
    for name, t in sd.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        out.append(name)
    return out


def write_train_state(state, model, folder: str, *, model_keys: set[str], written: WrittenFiles | None = None) -> None:
    """Save every TrainState leaf not already in the model file, keyed by its pytree path.

    With ``model=None`` (any pytree of states, see :func:`save_tree_checkpoint`) every leaf is saved.
    For a PeftModel the buffers (the frozen base model) are not saved: they never change in
    training, the metadata says so, and loading takes them from the live model.
    """
    tensors, metadata = train_state_tensors(state, model, model_keys=model_keys)
    write_safetensors(folder, STATE_FILE, tensors, metadata, written)


def train_state_tensors(state, model, *, model_keys: set[str]) -> tuple[dict, dict]:
    """The tensors and metadata of ``train_state.safetensors`` (see :func:`write_train_state`)."""
    in_model = state_leaves_in_model(state, model, model_keys)
    buffers_from_model = saves_adapter_only(model)
    tensors = {}
    for path, leaf in tree.named_leaves(state).items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"state leaf {path!r} is a {type(leaf).__name__}; only tensors can be saved (keep scalars as 0-d tensors)")
        if path in in_model or (buffers_from_model and path.startswith("buffers.")):
            continue
        tensors[path] = leaf.detach().contiguous().cpu()
    metadata = {"format": FORMAT, **({BUFFERS_KEY: "from_model"} if buffers_from_model else {})}
    if hasattr(state, "opt_state"):  # a TrainState (tree checkpoints hold any pytree)
        metadata["opt_state_structure"] = opt_state_structure(state)
    return tensors, metadata


def state_leaves_in_model(state, model, model_keys: set[str]) -> set[str]:
    """The state's leaf paths (``params.x.weight``) that the model file holds under ``model_keys``."""
    aliases = alias_groups(model)
    return {path for path in tree.named_leaves(state) if model_file_name(path, aliases, model_keys) is not None}


def expected_model_keys(model, state_dict: dict | None = None) -> set[str]:
    """The tensor names :func:`write_model` is expected to write: one name per shared storage of
    the state dict, none for a PeftModel (its file holds the adapter only). ``save_pretrained`` may
    write fewer (keys it ignores on save): :func:`save_checkpoint` checks against the written file."""
    if saves_adapter_only(model):
        return set()
    return set(_unique_names(model.state_dict() if state_dict is None else state_dict))


def opt_state_structure(state) -> str:
    """The optimizer state's tree structure (state types, fields and param names) as text.

    Leaves are stored by position (``opt_state.0.1...``), so two optimizers can have matching
    paths and shapes (AdamW's ``mu`` and Lion's ``mu``); the structure tells them apart.
    """
    _, treedef = tree.flatten(state.opt_state)
    return str(treedef)


def alias_groups(model) -> dict[str, list[str]]:
    """``{name: [every name of the same tensor]}`` for params and buffers (tied weights)."""
    if model is None:
        return {}
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def model_file_name(path: str, aliases: dict, model_keys: set[str]) -> str | None:
    """The model-file key holding the state leaf at ``path`` ("params.x.weight"), or None."""
    for prefix in ("params.", "buffers."):
        if path.startswith(prefix):
            name = path[len(prefix):]
            for alias in aliases.get(name, [name]):
                if alias in model_keys:
                    return alias
    return None


def write_rng_state(folder: str, *, written: WrittenFiles | None = None) -> None:
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
    write_safetensors(folder, RNG_FILE, tensors, metadata, written)


def write_safetensors(folder: str, rel: str, tensors: dict, metadata: dict, written: WrittenFiles | None) -> None:
    """Save ``tensors`` as safetensors into ``folder/rel``; ``written`` (when given) hashes it from
    the tensors in memory and fsyncs it in the background, else it is fsynced before this returns."""
    path = os.path.join(folder, rel)
    save_file(tensors, path, metadata=metadata)
    if written is None:
        fsync_file(path)
    else:
        written.add_tensors_file(rel, tensors)


class WrittenFiles:
    """The files of a checkpoint being written: each is hashed (and with ``fsync=True`` fsynced) in
    a background thread while the next one is written (the hash, safetensors' write and fsync all
    release the GIL).

    Use as a context manager around the writes; on leaving, every file is hashed (and durable), and
    :attr:`entries` holds their manifest entries. ``known``: entries of files written elsewhere
    (other ranks' shards), neither hashed nor fsynced here. The tensors handed to
    :meth:`add_tensors_file` must not change until then.
    """

    def __init__(self, folder: str, known: dict | None = None, *, fsync: bool = True):
        self.folder = folder
        self.fsync = fsync
        self.entries: dict[str, dict] = dict(known or {})
        self._pending: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="functrain-ckpt")

    def __contains__(self, rel: str) -> bool:
        return rel in self.entries or rel in self._pending

    def add_tensors_file(self, rel: str, tensors: dict) -> None:
        """A safetensors file just written from ``tensors``: hashed from memory (no read-back)."""
        self._pending[rel] = self._pool.submit(self._finish, rel, lambda full: _entry_as_written(full, tensors))

    def write_in_background(self, rel: str, tensors: dict, metadata: dict) -> None:
        """Write ``tensors`` as the safetensors file ``rel`` in a background thread (then hash it
        from memory); the caller goes on writing other files meanwhile. Writing ``rel`` again
        replaces it: call :meth:`wait` first."""
        if rel in self._pending and not self._pending[rel].done():
            raise RuntimeError(f"{rel!r} is still being written; wait({rel!r}) before writing it again")

        def write_then_hash(full: str) -> dict:
            save_file(tensors, full, metadata=metadata)
            return _entry_as_written(full, tensors)

        self._pending[rel] = self._pool.submit(self._finish, rel, write_then_hash)

    def wait(self, rel: str) -> None:
        """Wait until ``rel`` is written and hashed; its error, if any, is raised here."""
        self.entries[rel] = self._pending.pop(rel).result()

    def add_file(self, rel: str) -> None:
        """A file a library wrote: hashed from the page cache."""
        self._pending[rel] = self._pool.submit(self._finish, rel, file_entry)

    def add_unlisted(self) -> None:
        """Every file of the folder not handed over yet (the JSON files a library wrote). Hidden
        names are skipped: safetensors writes a file as ``.tmpXXXX`` and renames it, so one may be
        a background write in flight (the manifest still lists and hashes any that remain)."""
        for name in os.listdir(self.folder):
            if name not in self and not name.startswith(".") and os.path.isfile(os.path.join(self.folder, name)):
                self.add_file(name)

    def _finish(self, rel: str, entry_of) -> dict:
        full = os.path.join(self.folder, rel)
        entry = entry_of(full)
        if self.fsync:
            fsync_file(full)
        return entry

    def __enter__(self) -> "WrittenFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for rel, done in self._pending.items():  # waits even after an error: no write outlives the folder
                entry = done.result() if exc_type is None else done.exception()
                if exc_type is None:
                    self.entries[rel] = entry
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)


def _entry_as_written(path: str, tensors: dict) -> dict:
    """The manifest entry of the safetensors file at ``path`` that :func:`save_file` just wrote
    from ``tensors``: header bytes from the file, data bytes from the tensors."""
    if sys.byteorder != "little":  # safetensors byte-swaps on big-endian machines: hash the file
        return file_entry(path)
    with open(path, "rb") as f:
        head = f.read(8)
        head += f.read(int.from_bytes(head, "little"))
    layout = json.loads(head[8:])
    layout.pop("__metadata__", None)
    h, end = new_checksum(CHECKSUM, head), 0
    for name, info in sorted(layout.items(), key=lambda kv: kv[1]["data_offsets"]):
        data = _bytes_of(tensors[name])
        if info["data_offsets"] != [end, end + len(data)]:  # never, unless safetensors changes its layout
            raise CheckpointError(f"{path!r}: {name!r} is not where its header says; cannot hash it from memory")
        h.update(data)
        end += len(data)
    size = os.path.getsize(path)
    if size != len(head) + end:
        raise CheckpointError(f"{path!r} has {size} bytes, its header describes {len(head) + end}")
    return {CHECKSUM: h.hexdigest(), "bytes": size}


def _bytes_of(t: torch.Tensor):
    """A tensor's bytes as safetensors stores them (C order, on a little-endian machine), without a copy."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_manifest(folder: str, *, step: int, resumable: bool, known: dict | None = None, fsync: bool = True) -> None:
    """Write ``manifest.json`` listing every file in ``folder``; ``known``: entries of files hashed
    while written (the others are hashed here). ``fsync``: make the files not in ``known`` and the
    manifest durable before returning (else the caller's :class:`Durability` does)."""
    known = known or {}
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel == MANIFEST_FILE:  # re-listing a folder whose files changed (e.g. weights re-saved)
                continue
            size = os.path.getsize(full)
            entry = known.get(rel)
            if entry is None or entry["bytes"] != size:
                entry = file_entry(full)
                if fsync:
                    fsync_file(full)
            files[rel] = entry
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "resumable": resumable, "files": files}
    path = os.path.join(folder, MANIFEST_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def new_checksum(algorithm: str, data=b""):
    """A running checksum of ``algorithm`` (a :data:`CHECKSUMS` name) started with ``data``."""
    return CHECKSUMS[algorithm][0](data)


def file_entry(path: str, algorithm: str = CHECKSUM) -> dict:
    """The manifest entry ``{algorithm: hex digest, "bytes": size}`` of the file at ``path``
    (hashed through a memory map: no copy out of the page cache)."""
    size = os.path.getsize(path)
    h = new_checksum(algorithm)
    if size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return {algorithm: h.hexdigest(), "bytes": size}


def fsync_file(path: str) -> None:
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str) -> None:
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


# -- durability -------------------------------------------------------------------------------------


def open_for_fsync(folder: str, *, directory: bool = False) -> list[tuple[int, bool]]:
    """``[(fd, is_directory)]``: the folder itself (``directory=True``), else every file under it,
    then its sub-folders and itself. Opened now, so the background fsync reaches the same files
    whatever is renamed meanwhile (the folder into place, a later "moved aside")."""
    if directory:
        return _open_dir(folder)
    handles, dirs = [], []
    try:
        for root, _subdirs, names in os.walk(folder):
            for name in sorted(names):
                handles.append((os.open(os.path.join(root, name), os.O_RDONLY), False))
            dirs.append(root)
        for d in reversed(dirs):  # the folders last: their entries then point at durable files
            handles += _open_dir(d)
    except BaseException:
        close_all(handles)
        raise
    return handles


def _open_dir(path: str) -> list[tuple[int, bool]]:
    try:
        return [(os.open(path, os.O_RDONLY), True)]
    except OSError:  # some platforms cannot open directories
        return []


def close_all(handles) -> None:
    for fd, _ in handles:
        os.close(fd)


class Durability:
    """Checkpoints renamed into place whose fsyncs still run, in one background thread.

    :meth:`submit` hands over a checkpoint's open files (closed when done); :meth:`wait` returns
    once every one handed over is durable and raises the first failure (a :class:`CheckpointError`
    naming the checkpoint); :meth:`raise_failure` raises one that already happened without waiting.
    ``fsync`` is the function called on each file descriptor (``os.fsync``; tests pass a slow or a
    failing one)."""

    def __init__(self, fsync=os.fsync):
        self.fsync = fsync
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Future]] = []
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, path: str, handles: list[tuple[int, bool]]) -> None:
        """Fsync ``handles`` (then close them) in the background; ``path`` names the checkpoint."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="functrain-fsync")
            try:
                job = self._pool.submit(self._make_durable, path, handles)
            except RuntimeError:  # the interpreter is shutting down: no new thread, fsync here
                job = Future()
                try:
                    self._make_durable(path, handles)
                    job.set_result(None)
                except CheckpointError as e:
                    job.set_exception(e)
            self._pending.append((path, job))

    def pending(self) -> list[str]:
        """The checkpoints whose fsyncs have not finished yet."""
        with self._lock:
            return [path for path, job in self._pending if not job.done()]

    def wait(self) -> None:
        """Block until every checkpoint handed over is durable; raise the first failure."""
        with self._lock:
            jobs = list(self._pending)
        errors = [job.exception() for _, job in jobs]  # blocks until each is done
        with self._lock:
            self._pending = [item for item in self._pending if item not in jobs]
        _raise_first(errors)

    def raise_failure(self) -> None:
        """Raise a finished background fsync's failure now (each is reported once); never blocks."""
        with self._lock:
            failed = [(p, job) for p, job in self._pending if job.done() and job.exception() is not None]
            self._pending = [item for item in self._pending if item not in failed]
        _raise_first([job.exception() for _, job in failed])

    def _make_durable(self, path: str, handles) -> None:
        try:
            for fd, is_dir in handles:
                try:
                    self.fsync(fd)
                except OSError as e:
                    if not is_dir:  # a folder cannot be fsynced everywhere; a file must be
                        raise CheckpointError(f"{path!r} is not durable: fsync failed ({e}). A power cut could "
                                              "tear it (resume would detect that and fall back)") from e
        finally:
            close_all(handles)


def _raise_first(errors) -> None:
    errors = [e for e in errors if e is not None]
    if errors:
        raise errors[0]


DURABILITY = Durability()  # the background fsyncs of the checkpoints this process writes


def wait_durable(durability: Durability | None = None) -> None:
    """Block until every checkpoint written so far is durable (fsynced); raise a failed fsync."""
    (durability or DURABILITY).wait()


@atexit.register
def _durable_at_exit() -> None:
    # A normal exit (the Trainer and the runner end normally after SIGTERM too) leaves no checkpoint
    # undurable; this late, a failure can only be logged.
    try:
        DURABILITY.wait()
    except CheckpointError as e:
        logger.error("at exit: %s", e)


# -- verifying --------------------------------------------------------------------------------------


def verify_checkpoint(path: str, *, require_resumable: bool = True) -> dict:
    """Check a checkpoint folder against its manifest; return the manifest or raise CheckpointError.

    The manifest's shape is checked, every listed file must be a regular file inside the folder
    with the listed size and checksum (each file is read once, in chunks, and nothing is kept).
    Pickle-looking files are reported with a warning and ignored (never opened).
    """
    return _verified(path, require_resumable=require_resumable, keep=False).manifest


def read_checkpoint(path: str, *, require_resumable: bool = True, keep: bool = True,
                    only=None) -> "VerifiedCheckpoint":
    """Verify a checkpoint as :func:`verify_checkpoint` does and keep what it read: each listed
    file is read once and hashed on the way, safetensors straight into the tensors that keep
    them (no second copy of the checkpoint in memory), so the loaders given the result
    (:func:`load_train_state`, :func:`load_rng_state`, :func:`non_finite_tensors`, ...) read nothing
    from the disk again. ``keep=False``: verify
    only (the loaders then read from the disk).

    ``only``: the names of the files to read (verify, keep); the other listed files are checked
    for presence and size only, not read: another process verifies them (the other ranks' shards
    of a sharded checkpoint, see :mod:`functrain.parallel.checkpoint`) or nothing loads them."""
    return _verified(path, require_resumable=require_resumable, keep=keep, only=only)


def _verified(path: str, *, require_resumable: bool, keep: bool, only=None) -> "VerifiedCheckpoint":
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a folder")
    warn_about_pickles(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    if require_resumable:
        _check_resumable(path, manifest)
    contents: dict[str, bytes] = {}
    parsed: dict[str, tuple[dict, dict]] = {}
    for rel, entry in files.items():
        full = safe_file(path, rel, files)
        if only is not None and rel not in only:
            _check_entry(path, rel, entry, os.lstat(full).st_size, None)
        elif keep and rel.endswith(".safetensors"):
            parsed[rel] = read_safetensors_verified(path, rel, full, entry)
        elif keep and rel.endswith(".json"):
            data = read_file(full, entry["bytes"])
            _check_entry(path, rel, entry, len(data), new_checksum(entry_checksum(entry), data).hexdigest())
            contents[rel] = data
        else:
            size, digest = _hash_file(full, entry_checksum(entry))
            _check_entry(path, rel, entry, size, digest)
    verified = set(files) if only is None else set(files) & set(only)
    return VerifiedCheckpoint(path, manifest, contents, verified, parsed)


def read_safetensors_verified(path: str, rel: str, full: str, entry: dict) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the listed safetensors file ``rel`` (at ``full``, from :func:`safe_file`),
    its size and checksum checked: each byte is read once, into the tensor that keeps it
    (:mod:`functrain.io.tensor_file`)."""
    hasher = new_checksum(entry_checksum(entry))
    problem = None
    with _open_no_follow(full) as f:
        size = os.fstat(f.fileno()).st_size
        _check_entry(path, rel, entry, size, None)  # another size: refused before reading
        try:
            tensors, metadata = tensor_file.read_tensors(f, size, hasher)
        except tensor_file.MalformedFile as e:
            problem = e
        except EOFError as e:
            raise CheckpointError(f"checkpoint {path!r}: {rel!r} shrank while it was read ({e})") from None
        if f.read(1):
            raise CheckpointError(f"checkpoint {path!r}: {rel!r} grew while it was read")
    _check_entry(path, rel, entry, size, hasher.hexdigest())  # a corrupted file is reported as such
    if problem is not None:
        raise CheckpointError(f"{full!r} is not a readable safetensors file ({problem})")
    return tensors, metadata


def _check_resumable(path: str, manifest: dict) -> None:
    if not manifest["resumable"]:
        raise CheckpointError(f"checkpoint {path!r} holds only the model (save_only_model=True); "
                              "it cannot be resumed from")
    # A sharded checkpoint (functrain.parallel.checkpoint) has per-rank files + a layout instead.
    files = manifest["files"]
    for needed in (STATE_FILE if SHARDED_LAYOUT_FILE not in files else SHARDED_LAYOUT_FILE, TRAINER_STATE_FILE):
        if needed not in files:
            raise CheckpointError(f"checkpoint {path!r} has no {needed!r}; it cannot be resumed from")


def _check_entry(path: str, rel: str, entry: dict, size: int, digest: str | None) -> None:
    """Raise when a file's size or checksum is not its manifest entry's (``digest=None``: size only)."""
    if size != entry["bytes"]:
        raise CheckpointError(f"checkpoint {path!r}: {rel!r} has {size} bytes, the manifest says "
                              f"{entry['bytes']} (truncated or overwritten)")
    algorithm = entry_checksum(entry)
    if digest is not None and digest != entry[algorithm]:
        raise CheckpointError(f"checkpoint {path!r}: {rel!r} fails its checksum ({algorithm}): it is corrupted")


def entry_checksum(entry: dict) -> str:
    """The checksum algorithm of a (shape-checked) manifest entry: the one :data:`CHECKSUMS` key it has."""
    return next(name for name in CHECKSUMS if name in entry)


def read_file(full: str, expected: int) -> bytes:
    """The bytes of a checkpoint's JSON file (one read; a longer file gives ``expected + 1`` bytes,
    so a size mismatch shows)."""
    with _open_no_follow(full) as f:
        return f.read(expected + 1)


def _hash_file(full: str, algorithm: str) -> tuple[int, str]:
    """``(size, hex digest)`` of a file read once in chunks."""
    h, size = new_checksum(algorithm), 0
    with _open_no_follow(full) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _open_no_follow(full: str):
    # The folder's files were checked to be regular files inside it; O_NOFOLLOW keeps a symlink
    # swapped in since then from being followed.
    return os.fdopen(os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


class VerifiedCheckpoint:
    """A checkpoint whose listed files were checked against its manifest.

    From :func:`read_checkpoint` it holds the tensors of its safetensors files and the bytes of its
    JSON files as they were verified (the disk is not read again); from :func:`verify_checkpoint`
    (``contents`` empty) it reads from the folder like a path does. ``verified``: the files whose
    checksum this process checked (all listed ones, unless ``read_checkpoint(only=...)``).
    """

    def __init__(self, path: str, manifest: dict, contents: dict[str, bytes], verified=None, parsed=None):
        self.path, self.manifest, self.listed = path, manifest, manifest["files"]
        self.verified = set(self.listed) if verified is None else set(verified)
        self._contents = contents
        self._parsed: dict[str, tuple[dict, dict]] = dict(parsed or {})

    def __repr__(self):
        return f"VerifiedCheckpoint({self.path!r}, {len(self._contents) + len(self._parsed)} files in memory)"

    def holds(self, rel: str) -> bool:
        return rel in self._contents or rel in self._parsed

    def tensors(self, rel: str) -> dict[str, torch.Tensor]:
        return self._parsed[rel][0]

    def metadata(self, rel: str) -> dict:
        return self._parsed[rel][1]

    def json(self, rel: str):
        return json.loads(self._contents[rel])

    def drop(self) -> None:
        """Let go of the bytes and tensors held (once loaded, they live in the state)."""
        self._contents.clear()
        self._parsed.clear()


def read_manifest(path: str) -> dict[str, Any]:
    """The checkpoint's manifest, its shape checked (a malformed one is a CheckpointError)."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.lexists(manifest_path):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST_FILE}: it is incomplete (an interrupted "
                              "write) or was not written by functrain")
    _require_regular_inside(path, MANIFEST_FILE)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST_FILE} is unreadable (not valid JSON: {e})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST_FILE} is malformed: {problem}")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest's shape, or None."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    if manifest.get("format") != FORMAT:
        return f"format is {manifest.get('format')!r}, expected {FORMAT!r}"
    for key, kind in (("version", int), ("step", int), ("resumable", bool)):
        value = manifest.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key!r} is {value!r}, expected {kind.__name__}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"'files' is a {type(files).__name__}, expected an object of name -> {{checksum, bytes}}"
    for rel, entry in files.items():
        bad = _unsafe_name(rel)
        if bad:
            return f"file name {rel!r} {bad}"
        if not (isinstance(entry, dict) and _has_one_checksum(entry) and isinstance(entry.get("bytes"), int)
                and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0):
            expected = " or ".join(f"{name!r}: {digits} hex digits" for name, (_, digits) in CHECKSUMS.items())
            return f"entry for {rel!r} is {entry!r}, expected {{'bytes': int >= 0}} and one checksum ({expected})"
    return None


def _has_one_checksum(entry: dict) -> bool:
    named = [name for name in CHECKSUMS if name in entry]
    if len(named) != 1:
        return False
    digest, digits = entry[named[0]], CHECKSUMS[named[0]][1]
    return isinstance(digest, str) and len(digest) == digits


def _unsafe_name(rel) -> str | None:
    """Why ``rel`` is not a plain relative file name inside the folder, or None."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "is an absolute path"
    parts = re.split(r"[/\\]", rel)
    if any(p in ("", ".", "..") for p in parts):
        return "is not a normalized relative path (empty, '.' or '..' components)"
    return None


def _require_regular_inside(folder: str, rel: str) -> str:
    """``folder/rel`` if it is a regular file (not a symlink) whose real path is inside ``folder``."""
    bad = _unsafe_name(rel)
    if bad:
        raise CheckpointError(f"checkpoint {folder!r}: refusing to open {rel!r}: it {bad}")
    full = os.path.join(folder, rel)
    try:
        mode = os.lstat(full).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder!r} is missing {rel!r} (listed in its manifest)") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {folder!r}: {rel!r} is not a regular file (a symlink, folder or device); "
                              "functrain opens only regular files inside the checkpoint")
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise CheckpointError(f"checkpoint {folder!r}: {rel!r} resolves outside the checkpoint folder")
    return full


def safe_file(folder: str, rel: str, listed=None) -> str:
    """The path of ``rel`` in a checkpoint, if its manifest lists it and it is a regular file inside.

    ``listed``: the manifest's ``files`` (read from the folder when not given).
    """
    if listed is None:
        listed = read_manifest(folder)["files"]
    if rel not in listed:
        raise CheckpointError(f"checkpoint {folder!r}: {rel!r} is not listed in its {MANIFEST_FILE}; functrain "
                              "opens only the files the manifest lists")
    return _require_regular_inside(folder, rel)


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


def find_resumable_checkpoint(output_dir: str, *, require_finite: bool = False) -> str | None:
    """The newest complete, valid checkpoint in ``output_dir`` (bad ones skipped with a warning).

    ``require_finite``: also skip checkpoints holding NaN/Inf values (reads their tensors).
    """
    found = read_resumable_checkpoint(output_dir, require_finite=require_finite, keep=False)
    return None if found is None else found.path


def read_resumable_checkpoint(output_dir: str, *, require_finite: bool = False, keep: bool = True,
                              read=None) -> VerifiedCheckpoint | None:
    """:func:`find_resumable_checkpoint`, returning the checkpoint as :func:`read_checkpoint`
    read it (``keep=False``: verified only, as :func:`verify_checkpoint`). ``read(path,
    require_finite)``: how to read one candidate (raising :class:`CheckpointError` for a bad one);
    :func:`functrain.parallel.checkpoint.read_resumable_checkpoint` reads each rank's part."""
    read = read or functools.partial(read_finite_checkpoint, keep=keep)
    for step, path in reversed(checkpoint_dirs(output_dir)):
        try:
            found = read(path, require_finite)
        except CheckpointError as e:
            logger.warning("skipping %s: %s", os.path.basename(path), e)
            continue
        logger.info("resuming from %s (step %d), the newest valid checkpoint", path, step)
        return found
    return None


def read_finite_checkpoint(path: str, require_finite: bool, *, keep: bool = True) -> VerifiedCheckpoint:
    """:func:`read_checkpoint`; with ``require_finite``, a checkpoint holding NaN/Inf is an error."""
    found = read_checkpoint(path, keep=keep)
    bad = non_finite_tensors(found) if require_finite else []
    if bad:
        raise CheckpointError(f"it holds non-finite values (NaN/Inf) in {bad}")
    return found


# -- loading ----------------------------------------------------------------------------------------
#
# Every loader takes a folder path or a VerifiedCheckpoint (from read_checkpoint: the verified bytes
# are parsed, the disk is not read again) and reads through checkpoint_files().


class _DiskFiles:
    """A folder's files read from the disk (safetensors memory-mapped, only the tensors asked for).

    ``listed``: the manifest's files; when given only those are opened (else any regular file
    inside the folder: a model folder without a manifest)."""

    def __init__(self, folder: str, listed):
        self.path, self.listed = folder, listed

    def has(self, rel: str) -> bool:
        if self.listed is not None:
            return rel in self.listed
        return os.path.lexists(os.path.join(self.path, rel))

    def keys(self, rel: str) -> list[str]:
        with open_safetensors(_checked(self.path, rel, self.listed)) as f:
            return list(f.keys())

    def tensors(self, rel: str, keys=None) -> dict[str, torch.Tensor]:
        with open_safetensors(_checked(self.path, rel, self.listed)) as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}

    def metadata(self, rel: str) -> dict:
        with open_safetensors(_checked(self.path, rel, self.listed)) as f:
            return f.metadata() or {}

    def rows(self, rel: str, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (clipped to the tensor's) of ``key``, reading only those."""
        with open_safetensors(_checked(self.path, rel, self.listed)) as f:
            part = f.get_slice(key)
            n = part.get_shape()[0]
            return part[min(start, n):min(stop, n)]

    def json(self, rel: str):
        with open(_checked(self.path, rel, self.listed), encoding="utf-8") as f:
            return json.load(f)


class _HeldFiles(_DiskFiles):
    """A VerifiedCheckpoint's files: the ones it holds from memory, any other from the disk."""

    def __init__(self, checkpoint: VerifiedCheckpoint):
        super().__init__(checkpoint.path, checkpoint.listed)
        self.checkpoint = checkpoint

    def keys(self, rel: str) -> list[str]:
        return list(self.checkpoint.tensors(rel)) if self.checkpoint.holds(rel) else super().keys(rel)

    def tensors(self, rel: str, keys=None) -> dict[str, torch.Tensor]:
        if not self.checkpoint.holds(rel):
            return super().tensors(rel, keys)
        held = self.checkpoint.tensors(rel)
        return dict(held) if keys is None else {k: held[k] for k in keys}

    def metadata(self, rel: str) -> dict:
        return self.checkpoint.metadata(rel) if self.checkpoint.holds(rel) else super().metadata(rel)

    def rows(self, rel: str, key: str, start: int, stop: int) -> torch.Tensor:
        if not self.checkpoint.holds(rel):
            return super().rows(rel, key, start, stop)
        whole = self.checkpoint.tensors(rel)[key]
        part = whole[start:stop]
        return whole if part.shape == whole.shape else part.clone()  # a view would pin the whole tensor

    def json(self, rel: str):
        return self.checkpoint.json(rel) if self.checkpoint.holds(rel) else super().json(rel)


def checkpoint_files(source) -> _DiskFiles:
    """The files of ``source``: a VerifiedCheckpoint's (held ones from memory) or a folder's (only
    those its manifest lists when it has one)."""
    if isinstance(source, VerifiedCheckpoint):
        return _HeldFiles(source)
    folder = os.fspath(source)
    return _DiskFiles(folder, _listed_files(folder))


def weights_index(folder: str, listed=None) -> dict[str, str]:
    """``{tensor name: file}`` for the model weights (single file or sharded with an index).

    ``listed``: the manifest's files. When given (loading a checkpoint), an index is used only if
    listed, and every shard it names must be listed too; without it (a folder just written), the
    folder's own files are read.
    """
    return weights_index_in(_DiskFiles(folder, listed))


def weights_index_in(files: _DiskFiles) -> dict[str, str]:
    folder = files.path
    if files.has(MODEL_INDEX_FILE):
        try:
            weight_map = files.json(MODEL_INDEX_FILE)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder!r}: {MODEL_INDEX_FILE} is malformed ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder!r}: {MODEL_INDEX_FILE} has no weight_map of name -> file")
        for shard in set(weight_map.values()):
            _checked(folder, shard, files.listed)
        return dict(weight_map)
    if not files.has(MODEL_FILE):
        raise CheckpointError(f"{folder!r} has no {MODEL_FILE} (nor {MODEL_INDEX_FILE})"
                              + (" listed in its manifest" if files.listed is not None else ""))
    return {k: MODEL_FILE for k in files.keys(MODEL_FILE)}


def _checked(folder: str, rel: str, listed) -> str:
    """``folder/rel``: through :func:`safe_file` when the manifest's files are known."""
    if listed is None:
        return _require_regular_inside(folder, rel)
    return safe_file(folder, rel, listed)


def _listed_files(folder: str):
    """The manifest's files when the folder has a manifest (a checkpoint), else None (a model folder)."""
    if os.path.lexists(os.path.join(folder, MANIFEST_FILE)):
        return read_manifest(folder)["files"]
    return None


def open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path!r} is not a readable safetensors file ({e})") from None


def _read_tensors(files: _DiskFiles, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read ``{key: tensor}`` for ``wanted = {key: filename}``, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for k, fname in wanted.items():
        by_file.setdefault(fname, []).append(k)
    out = {}
    for fname, keys in by_file.items():
        out.update(files.tensors(fname, keys))
    return out


def check_optimizer_structure(folder, template) -> None:
    """Raise :class:`OptimizerMismatchError` when the checkpoint's optimizer state has another
    structure than ``template``'s (checkpoints from before this record are not checked)."""
    files = checkpoint_files(folder)
    if not files.has(STATE_FILE):
        return
    saved = files.metadata(STATE_FILE).get("opt_state_structure")
    current = opt_state_structure(template)
    if saved is not None and saved != current:
        raise OptimizerMismatchError(f"checkpoint {files.path!r} holds the state of another optimizer: saved "
                                     f"{_short(saved)}, this run's optimizer has {_short(current)}")


def _short(structure: str, limit: int = 300) -> str:
    return structure if len(structure) <= limit else structure[:limit] + "..."


def non_finite_tensors(folder, limit: int = 5) -> list[str]:
    """Names (``file:tensor``) of floating-point tensors holding NaN/Inf in the checkpoint's
    weights and train state (up to ``limit``); the generators' file is not checked. Of a
    :class:`VerifiedCheckpoint`, only the files it verified (this process's part) are checked."""
    files = checkpoint_files(folder)
    found = []
    checked = folder.verified if isinstance(folder, VerifiedCheckpoint) else files.listed
    for rel in sorted(checked):
        if not rel.endswith(".safetensors") or rel == RNG_FILE:
            continue
        for key, t in files.tensors(rel).items():
            if t.is_floating_point() and not _all_finite(t):
                found.append(f"{rel}:{key}")
                if len(found) >= limit:
                    return found
    return found


def _all_finite(t: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite, so a finite sum settles it in one cheap pass;
    # a non-finite sum may be an overflow of finite values: check element by element then.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def load_train_state(folder, template, model):
    """Rebuild a TrainState from ``folder`` shaped exactly like ``template`` (a fresh state).

    ``folder``: a path, or the :class:`VerifiedCheckpoint` :func:`read_checkpoint` returned (then
    nothing is read from the disk again). The template gives the tree structure (so NamedTuple
    types come back exactly), and each leaf's shape, dtype and device; a mismatch is a clear error
    naming the leaf. With ``model=None`` every leaf comes from ``train_state.safetensors`` (any
    pytree, no model file). Only files the manifest lists are opened.
    """
    files = checkpoint_files(folder)
    if files.listed is None:
        read_manifest(files.path)  # raises: a checkpoint has a manifest
    state_keys = set(files.keys(STATE_FILE))
    buffers_from_model = files.metadata(STATE_FILE).get(BUFFERS_KEY) == "from_model"
    # An adapter checkpoint, or a tree checkpoint (model=None): no model file.
    model_index = {} if buffers_from_model or model is None else weights_index_in(files)
    aliases = alias_groups(model)
    wanted_model, wanted_state = {}, {}
    paths = tree.paths(template)
    for path in paths:
        if path in state_keys:
            wanted_state[path] = STATE_FILE
        elif buffers_from_model and path.startswith("buffers."):
            continue  # the frozen base: the template's own tensor (the live model's)
        else:
            name = model_file_name(path, aliases, set(model_index))
            if name is None:
                raise CheckpointError(f"checkpoint {files.path!r} has no tensor for {path!r} (neither in {STATE_FILE} "
                                      "nor in the model weights); was it written for a different model or optimizer?")
            wanted_model[path] = name
    from_state = _read_tensors(files, wanted_state)
    from_model = _read_tensors(files, {name: model_index[name] for name in wanted_model.values()})
    leaves = []
    for path, ref in zip(paths, tree.leaves(template)):
        if path not in from_state and path not in wanted_model:
            leaves.append(ref)
            continue
        t = from_state[path] if path in from_state else from_model[wanted_model[path]]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {files.path!r}: {path!r} is {t.dtype}{list(t.shape)}, the current "
                                  f"state expects {ref.dtype}{list(ref.shape)}")
        leaves.append(t.to(ref.device))
    _, treedef = tree.flatten(template)
    return tree.unflatten(treedef, leaves)


def load_model_weights(model, folder) -> None:
    """Copy the weights in ``folder`` into ``model`` (tied aliases may be absent from the file).

    In a checkpoint (a folder with a manifest) only listed files are read."""
    files = checkpoint_files(folder)
    tensors = _read_tensors(files, weights_index_in(files))
    aliases = alias_groups(model)
    own = dict(model.state_dict(keep_vars=True))
    missing = [n for n in own if not any(a in tensors for a in aliases.get(n, [n]))]
    unexpected = [n for n in tensors if n not in own]
    if missing or unexpected:
        raise CheckpointError(f"weights in {files.path!r} do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in own.items():
            src = next(tensors[a] for a in aliases.get(name, [name]) if a in tensors)
            target.copy_(src)


def load_rng_state(folder) -> None:
    """Restore the global generators saved by :func:`write_rng_state` (if the manifest lists them)."""
    files = checkpoint_files(folder)
    if not files.has(RNG_FILE):
        return
    meta = files.metadata(RNG_FILE)
    t = files.tensors(RNG_FILE)
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


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None = None,
                       just_written: str | None = None) -> list[str]:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the best one; return deleted paths.

    The newest checkpoint is kept too (it is the one to resume from), so with ``save_total_limit=1``
    and a best checkpoint that is not the newest, two remain. ``just_written`` is never deleted:
    if higher-numbered checkpoints exist (they cannot, once the Trainer's output_dir rule ran), it
    is an error rather than a silent loss of the run's own checkpoint. Deleting waits until every
    checkpoint written is durable (:func:`wait_durable`), so a power cut leaves a newer one.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    ckpts = [p for _, p in checkpoint_dirs(output_dir)]
    if just_written is not None and ckpts and os.path.abspath(ckpts[-1]) != os.path.abspath(just_written):
        raise CheckpointError(f"rotation in {output_dir!r}: {os.path.basename(ckpts[-1])} is newer than the checkpoint "
                              f"just written ({os.path.basename(just_written)}); another run writes there. Nothing "
                              "was deleted")
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
    # Only once every newer checkpoint is durable: a power cut must leave one to resume from.
    wait_durable()
    # Rename first so a crash mid-delete never leaves a half-deleted "checkpoint-N".
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_tree(folder, template) -> tuple[Any, dict]:
    """``(state, progress)`` from a :func:`save_tree_checkpoint` folder (a path, verify it first;
    or :func:`read_checkpoint`'s result), ``state`` shaped like ``template``; restores the global
    generators too."""
    state = load_train_state(folder, template, None)  # (raises for a folder without a manifest)
    progress = checkpoint_files(folder).json(TRAINER_STATE_FILE)
    load_rng_state(folder)
    return state, progress

