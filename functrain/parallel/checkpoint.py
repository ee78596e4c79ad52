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
                            processing_class=None) -> str:
    """Write ``output_dir/checkpoint-{step}`` from every rank (a collective); return its path.

    ``model`` must already hold the full weights on rank 0 (the Trainer gathers them first).
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
                ck.write_model(model, tmp, processing_class=processing_class, written=written)
                ck.write_rng_state(tmp, written=written)
            if trainer_state is not None:
                trainer_state.save_to_json(os.path.join(tmp, ck.TRAINER_STATE_FILE))
            if args is not None:
                args.save_to_json(os.path.join(tmp, ck.ARGS_FILE))
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


# -- loading ----------------------------------------------------------------------------------------


class _Pieces:
    """Where each leaf's rows are stored: ``{path: [(file, key, first_row)]}``."""

    def __init__(self, folder: str, template, model):
        self.folder = folder
        self.pieces: dict[str, list[tuple[str, str, int]]] = {}
        self.listed = listed = ck.read_manifest(folder)["files"]
        if is_sharded_checkpoint(folder):
            with open(ck.safe_file(folder, LAYOUT_FILE, listed), encoding="utf-8") as f:
                layout = json.load(f)
            for fname in layout["files"]:
                with ck.open_safetensors(ck.safe_file(folder, fname, listed)) as sf:
                    offsets = json.loads((sf.metadata() or {}).get("offsets", "{}"))
                for path, first in offsets.items():
                    self.pieces.setdefault(path, []).append((fname, path, int(first)))
            return
        # A single-process checkpoint: leaves in train_state.safetensors or in the model file.
        with ck.open_safetensors(ck.safe_file(folder, ck.STATE_FILE, listed)) as sf:
            state_keys = set(sf.keys())
        model_index = ck.weights_index(folder, listed)
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
        parts = []
        for fname, key, first in sorted(pieces, key=lambda p: p[2]):
            with ck.open_safetensors(ck.safe_file(self.folder, fname, self.listed)) as sf:
                sl = sf.get_slice(key)
                shape = sl.get_shape()
                if ref.ndim == 0:
                    return sf.get_tensor(key)
                lo, hi = max(start, first), min(stop, first + shape[0])
                if lo < hi:
                    parts.append(sl[lo - first:hi - first])
        if not parts:
            return torch.empty((0, *ref.shape[1:]), dtype=ref.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_train_state(folder: str, template, model):
    """A TrainState shaped like ``template`` (plain or sharded) from any functrain checkpoint.

    Each rank reads only its rows of each ``DTensor`` leaf; plain leaves are read whole. The
    checkpoint may come from any number of processes, sharded or not.
    """
    pieces = _Pieces(folder, template, model)
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

