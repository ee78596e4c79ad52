"""Sharded checkpoints: per-rank safetensors + a JSON layout, loadable on any number of processes.

``torch.distributed.checkpoint``'s default storage pickles its ``.metadata`` file; its
pickle-free ``HuggingFaceStorageWriter`` is not atomic and cannot consolidate integer tensors in
torch 2.13 (docs/distributed.md, "Checkpoints"). A sharded checkpoint is instead, inside the usual
``checkpoint-N/`` folder (see :mod:`functrain.io.checkpoint`):

- ``train_state-{rank:05d}-of-{world:05d}.safetensors``: the rank's local shard of every
  ``DTensor`` leaf of the TrainState, keyed by pytree path; rank 0's file also holds the
  replicated (plain) leaves. The safetensors metadata maps each key to its global row offset;
- ``train_state_layout.json``: world size, the shard files, and each leaf's global shape/dtype;
- ``model.safetensors``: the consolidated weights (rank 0), loadable by ``from_pretrained``;
- ``trainer_state.json``, ``training_args.json``, ``rng_state.safetensors``, ``manifest.json``.

Loading reads, for each leaf of the template state, only the rows this rank needs under the
template's placement (``Shard(0)`` of any world size, or the whole tensor), so a checkpoint saved
on N processes resumes on M. Plain single-process checkpoints load the same way.
The folder is written into a temporary name and renamed by rank 0 after every rank finished
(a shared filesystem is assumed, as with any multi-process checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from functrain.io import checkpoint as ck
from functrain.parallel import distributed as fd
from functrain.core import tree

LAYOUT_FILE = ck.SHARDED_LAYOUT_FILE
LAYOUT_FORMAT = "functrain.sharded_train_state"


def shard_file_name(rank: int, world: int) -> str:
    return f"train_state-{rank:05d}-of-{world:05d}.safetensors"


def _row_range(t: torch.Tensor) -> tuple[int, int]:
    """The global rows ``[start, stop)`` of dim 0 this rank holds of ``t`` (all rows for plain tensors)."""
    if fd.is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if t.ndim == 0:
            return 0, 0
        return offset[0], offset[0] + local_shape[0]
    return (0, t.shape[0]) if t.ndim else (0, 0)


def save_sharded_checkpoint(output_dir: str, step: int, *, model, train_state, trainer_state=None, args=None,
                            processing_class=None, model_state_dict=None) -> str:
    """Write ``output_dir/checkpoint-{step}`` from every rank (a collective); return its path.

    ``model_state_dict``: the full weights on rank 0 (the Trainer gathers them:
    :func:`functrain.parallel.fsdp.full_state_dict`); ``None``: ``model`` holds them on rank 0.
    """
    r, world = fd.rank(), fd.world_size()
    final = ck.checkpoint_path(output_dir, step)
    tmp = os.path.join(output_dir, f".tmp-{ck.PREFIX}-{step}-sharded")
    if r == 0:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    fd.barrier()
    try:
        leaves = tree.named_leaves(train_state)
        tensors, offsets = {}, {}
        for path, leaf in leaves.items():
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"TrainState leaf {path!r} is a {type(leaf).__name__}; only tensors can be saved")
            if fd.is_dtensor(leaf):
                tensors[path] = leaf.to_local().detach().contiguous().cpu()
                offsets[path] = _row_range(leaf)[0]
            elif r == 0:
                tensors[path] = leaf.detach().contiguous().cpu()
                offsets[path] = 0
        with ck.WrittenFiles(tmp) as written:  # hashed from memory, fsynced
            ck.write_safetensors(tmp, shard_file_name(r, world), tensors,
                                 {"format": LAYOUT_FORMAT, "offsets": json.dumps(offsets)}, written)
        entries = _entries_of_all_ranks(written.entries)  # each rank hashed its own shard while writing it
        if r == 0:
            layout = {"format": LAYOUT_FORMAT, "world_size": world,
                      "files": [shard_file_name(i, world) for i in range(world)],
                      "leaves": {p: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                     "sharded": fd.is_dtensor(t)} for p, t in leaves.items()}}
            with open(os.path.join(tmp, LAYOUT_FILE), "w", encoding="utf-8") as f:
                json.dump(layout, f, indent=1, sort_keys=True)
            with ck.WrittenFiles(tmp, known=entries) as written:
                ck.write_model(model, tmp, processing_class=processing_class, written=written,
                               state_dict=model_state_dict)
                ck.write_rng_state(tmp, written=written)
                if trainer_state is not None:
                    trainer_state.save_to_json(os.path.join(tmp, ck.TRAINER_STATE_FILE))
                if args is not None:
                    args.save_to_json(os.path.join(tmp, ck.ARGS_FILE))
                written.add_unlisted()
            ck.write_manifest(tmp, step=step, resumable=True, known=written.entries)
            ck.fsync_dir(tmp)
            ck.replace_dir(tmp, final)
            ck.fsync_dir(output_dir)
    except BaseException:
        if r == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd.barrier()
    return final


def _entries_of_all_ranks(entries: dict) -> dict:
    """Every rank's manifest entries merged (a collective; it also waits for every shard's write)."""
    if not fd.is_distributed():
        return dict(entries)
    gathered: list = [None] * fd.world_size()
    torch.distributed.all_gather_object(gathered, entries)
    return {rel: entry for part in gathered for rel, entry in part.items()}


def is_sharded_checkpoint(folder: str) -> bool:
    """True when the checkpoint's manifest lists a sharded layout (an unlisted layout file is ignored)."""
    try:
        return LAYOUT_FILE in ck.read_manifest(folder)["files"]
    except ck.CheckpointError:
        return False


def verify_resumable(folder: str) -> None:
    """Like :func:`functrain.io.checkpoint.verify_checkpoint`, accepting a sharded train state."""
    manifest = ck.verify_checkpoint(folder, require_resumable=False)
    if not manifest.get("resumable"):
        raise ck.CheckpointError(f"checkpoint {folder!r} holds only the model; it cannot be resumed from")


# -- reading: each process its part, once ----------------------------------------------------------


def files_to_read(manifest: dict, rank: int, world: int) -> set[str] | None:
    """The files process ``rank`` of ``world`` reads whole (verifies and keeps) to resume; None: all.

    A replicated checkpoint is loaded whole by every process. Of a sharded one, a process reads its
    own shard when the world size is the saved one (else every ``world``-th shard: each shard is
    verified by one process, and the rows a process needs from the others are read from the disk),
    the generators and the JSON files. The consolidated weights are not loaded on resume (the shards
    hold the params), so they are checked for size only.
    """
    files = manifest["files"]
    if LAYOUT_FILE not in files:
        return None
    shards = sorted(rel for rel in files if _SHARD_RE.match(rel))
    saved_world = len(shards)
    mine = {shard_file_name(rank, world)} if saved_world == world else set(shards[rank::world])
    return mine | {rel for rel in files if rel == ck.RNG_FILE or rel.endswith(".json")}


_SHARD_RE = re.compile(r"^train_state-\d{5}-of-\d{5}\.safetensors$")


def read_checkpoint(path: str, *, require_resumable: bool = True) -> ck.VerifiedCheckpoint:
    """:func:`functrain.io.checkpoint.read_checkpoint` for every process of a run (one process
    too): each reads its part once (:func:`files_to_read`), verifies it and keeps it for the
    loaders; a bad part on any rank is a :class:`CheckpointError` on every rank (a collective)."""
    def read():
        manifest = ck.read_manifest(path) if os.path.isdir(path) else None
        only = None if manifest is None else files_to_read(manifest, fd.rank(), fd.world_size())
        return ck.read_checkpoint(path, require_resumable=require_resumable, only=only)

    return _on_every_rank(read)


def non_finite_tensors(found: ck.VerifiedCheckpoint) -> list[str]:
    """:func:`functrain.io.checkpoint.non_finite_tensors` over every rank's part (a collective)."""
    return sorted({name for part in _gathered(ck.non_finite_tensors(found)) for name in part})[:5]


def read_resumable_checkpoint(output_dir: str, *, require_finite: bool = False) -> ck.VerifiedCheckpoint | None:
    """The newest valid checkpoint in ``output_dir``, each rank having read its part (every rank
    agrees on which, a collective per candidate); None when there is none."""
    def read(path: str, finite: bool) -> ck.VerifiedCheckpoint:
        found = read_checkpoint(path)
        bad = non_finite_tensors(found) if finite else []
        if bad:
            raise ck.CheckpointError(f"it holds non-finite values (NaN/Inf) in {bad}")
        return found

    return ck.read_resumable_checkpoint(output_dir, require_finite=require_finite, read=read)


def _on_every_rank(read):
    """``read()`` on every rank; any rank's :class:`CheckpointError` is raised on every rank."""
    try:
        result, error = read(), None
    except ck.CheckpointError as e:
        result, error = None, str(e)
    errors = [(r, e) for r, e in enumerate(_gathered(error)) if e is not None]
    if errors:
        rank, message = errors[0]
        raise ck.CheckpointError(f"(rank {rank}) {message}" if fd.is_distributed() else message)
    return result


def _gathered(value) -> list:
    """``value`` of every rank, in rank order (``[value]`` in one process)."""
    if not fd.is_distributed():
        return [value]
    out: list = [None] * fd.world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# -- loading ----------------------------------------------------------------------------------------


class _Pieces:
    """Where each leaf's rows are stored: ``{path: [(file, key, first_row)]}``; read through
    ``files`` (a verified checkpoint's held bytes, or the disk)."""

    def __init__(self, source, template, model):
        self.files = files = ck.checkpoint_files(source)
        self.folder = files.path
        self.pieces: dict[str, list[tuple[str, str, int]]] = {}
        if files.listed is None:
            ck.read_manifest(self.folder)  # raises: a checkpoint has a manifest
        if files.has(LAYOUT_FILE):
            for fname in files.json(LAYOUT_FILE)["files"]:
                offsets = json.loads(files.metadata(fname).get("offsets", "{}"))
                for path, first in offsets.items():
                    self.pieces.setdefault(path, []).append((fname, path, int(first)))
            return
        # A single-process checkpoint: leaves in train_state.safetensors or in the model file.
        state_keys = set(files.keys(ck.STATE_FILE))
        model_index = ck.weights_index_in(files)
        aliases = ck.alias_groups(model)
        for path in tree.paths(template):
            if path in state_keys:
                self.pieces[path] = [(ck.STATE_FILE, path, 0)]
            else:
                name = ck.model_file_name(path, aliases, set(model_index))
                if name is not None:
                    self.pieces[path] = [(model_index[name], name, 0)]

    def read(self, path: str, start: int, stop: int, ref: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` of the leaf at ``path`` (the whole tensor when 0-d)."""
        pieces = self.pieces.get(path)
        if not pieces:
            raise ck.CheckpointError(f"checkpoint {self.folder!r} has no tensor for {path!r}; was it written for a "
                                     "different model or optimizer?")
        if ref.ndim == 0:
            fname, key, _ = pieces[0]
            return self.files.tensors(fname, [key])[key]
        parts = []
        for fname, key, first in sorted(pieces, key=lambda p: p[2]):
            if stop > first:
                part = self.files.rows(fname, key, max(start - first, 0), stop - first)
                if part.shape[0]:
                    parts.append(part)
        if not parts:
            return torch.empty((0, *ref.shape[1:]), dtype=ref.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_train_state(source, template, model):
    """A TrainState shaped like ``template`` (plain or sharded) from any functrain checkpoint.

    ``source``: a folder, or what :func:`read_checkpoint` returned (its files are loaded from the
    bytes verified; rows of other ranks' shards from the disk). Each rank takes only its rows of
    each ``DTensor`` leaf; plain leaves whole. The checkpoint may come from any number of
    processes, sharded or not.
    """
    pieces = _Pieces(source, template, model)
    folder = pieces.folder
    leaves = []
    for path, ref in tree.named_leaves(template).items():
        start, stop = _row_range(ref)
        local = pieces.read(path, start, stop, ref)
        local_ref = ref.to_local() if fd.is_dtensor(ref) else ref
        if tuple(local.shape) != tuple(local_ref.shape) or local.dtype != ref.dtype:
            raise ck.CheckpointError(f"checkpoint {folder!r}: {path!r} gives {local.dtype}{list(local.shape)} on "
                                     f"this rank, the current state expects {ref.dtype}{list(local_ref.shape)}")
        local = local.to(local_ref.device)
        if fd.is_dtensor(ref):
            from torch.distributed.tensor import DTensor

            local = DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                                       shape=ref.shape, stride=ref.stride())
        leaves.append(local)
    _, treedef = tree.flatten(template)
    return tree.unflatten(treedef, leaves)
