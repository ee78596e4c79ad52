"""Worker of tests/test_checkpoint_read_once.py, run on 2 ranks by torchrun: train 2 steps with a
checkpoint, then resume it through a new Trainer and count the bytes that resume read.

Bytes read: ``/proc/self/io`` ``rchar`` (every read-like call of the process) plus the bytes of
tensors the checkpoint loaders take from the disk through a memory map (``_DiskFiles.tensors`` /
``.rows``: safetensors' reads, which ``rchar`` does not see). Each rank writes result-{rank}.json.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functrain as ft  # noqa: E402
from functrain import distributed as fd  # noqa: E402
from functrain.io import checkpoint as ck  # noqa: E402

from _trainer_fixtures import make_dataset  # noqa: E402


class Wide(torch.nn.Module):
    """An MLP of ~0.9M params: the checkpoint's JSON and headers are < 1% of its bytes."""

    def __init__(self, width=384, layers=6):
        super().__init__()
        blocks = [torch.nn.Linear(8, width), torch.nn.Tanh()]
        for _ in range(layers - 1):
            blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


def make_trainer(output_dir, fsdp, **kw):
    torch.manual_seed(0)
    args = ft.TrainingArguments(output_dir, max_steps=2, **kw, per_device_train_batch_size=4, learning_rate=1e-2,
                                save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
                                disable_tqdm=True, fsdp=fsdp, seed=3)
    return ft.Trainer(model=Wide(), args=args, train_dataset=make_dataset(n=32))


def counted_disk_reads():
    """Count the bytes of tensors the loaders take from the disk (memory-mapped: not in rchar)."""
    counted = {"bytes": 0}
    tensors, rows = ck._DiskFiles.tensors, ck._DiskFiles.rows

    def count(out):
        values = out.values() if isinstance(out, dict) else [out]
        counted["bytes"] += sum(t.numel() * t.element_size() for t in values)
        return out

    ck._DiskFiles.tensors = lambda self, *a, **k: count(tensors(self, *a, **k))
    ck._DiskFiles.rows = lambda self, *a, **k: count(rows(self, *a, **k))
    return counted


def share(path, sharded):
    """The bytes this rank must read to resume: every file (data parallel), or its own shard plus
    the generators and the JSON files (sharded); and the manifest."""
    files = {rel: e["bytes"] for rel, e in ck.read_manifest(path)["files"].items()}
    manifest = os.path.getsize(os.path.join(path, ck.MANIFEST_FILE))
    if not sharded:
        return sum(files.values()) + manifest
    own = f"train_state-{fd.rank():05d}-of-{fd.world_size():05d}.safetensors"
    small = sum(n for rel, n in files.items() if rel.endswith(".json") or rel == ck.RNG_FILE)
    return files[own] + small + manifest


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def local_leaves(state):
    return [t.to_local() if fd.is_dtensor(t) else t for t in ft.tree.leaves(state)]


def main(out_dir, opts):
    output_dir = os.path.join(out_dir, "run")
    trainer = make_trainer(output_dir, opts["fsdp"], overwrite_output_dir=True)
    trainer.train()
    saved = [t.detach().clone() for t in local_leaves(trainer.train_state)]
    path = ck.checkpoint_path(output_dir, 2)
    resumed = make_trainer(output_dir, opts["fsdp"])  # built (and its imports done) before counting
    disk = counted_disk_reads()
    before = rchar()
    resumed.train(resume_from_checkpoint=opts.get("resume", True))
    read = rchar() - before + disk["bytes"]
    loaded = local_leaves(resumed.train_state)
    result = {"rank": fd.rank(), "read": read, "share": share(path, bool(opts["fsdp"])),
              "checkpoint_bytes": share(path, False), "disk_tensor_bytes": disk["bytes"],
              "equal": len(saved) == len(loaded) and all(torch.equal(a, b) for a, b in zip(saved, loaded)),
              "global_step": resumed.state.global_step}
    if opts.get("corrupt"):
        result["after_corruption"] = corrupted_shard_is_refused_on_every_rank(output_dir, path)
    with open(os.path.join(out_dir, f"result-{fd.rank()}.json"), "w") as f:
        json.dump(result, f)


def corrupted_shard_is_refused_on_every_rank(output_dir, path):
    """Flip a byte of rank 1's shard: only rank 1 reads it, and every rank must refuse the checkpoint."""
    from functrain.parallel import checkpoint as dck

    fd.barrier()
    if fd.rank() == 0:
        with open(os.path.join(path, dck.shard_file_name(1, 2)), "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x10]))
    fd.barrier()
    try:
        dck.read_checkpoint(path)
        error = None
    except ck.CheckpointError as e:
        error = str(e)
    newest = dck.read_resumable_checkpoint(output_dir)
    return {"error": error, "newest_valid": None if newest is None else newest.path}


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
    fd.barrier()
