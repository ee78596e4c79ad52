"""Checkpoint I/O: functrain's save against a raw ``safetensors.torch.save_file`` of the same
tensors, and how many bytes a resume reads.

A GPT-2 of ~23M params (6 layers, d512, vocab 8192) with an AdamW state (mu, nu filled with
random values): ~280 MB of tensors. Contenders, interleaved round by round in one process:

* ``raw_save_file``: ``safetensors.torch.save_file`` of every tensor (weights + optimizer state)
  into one file: the floor (no fsync, no hash, no atomic rename);
* ``raw_save_file_fsync``: the same plus an fsync (what a crash-safe write needs at least);
* ``functrain_save``: ``functrain.io.checkpoint.save_checkpoint`` until it returns
  (``save_pretrained`` weights, ``train_state.safetensors``, rng state, each file hashed
  (xxh3_128) in a background thread while the next is written, manifest, rename); its fsyncs
  continue in the background and are waited for outside the timing, before the next contender;
* ``functrain_save_durable``: the same plus ``wait_durable()`` (every file, the manifest and both
  folders fsynced).

The target (issue 18: save <= 1.2x "the raw safetensors save") is stated against
``raw_save_file``, which does not fsync: ``functrain_save / raw_save_file`` is the blocking cost a
training loop sees; ``functrain_save_durable / raw_save_file_fsync`` compares the same durability
on both sides.

Resume: ``read_checkpoint`` + ``load_train_state`` + ``load_rng_state`` + ``non_finite_tensors``
(what the Trainer runs), bytes read counted by ``/proc/self/io`` ``rchar`` (every ``read`` call of
the process) against the checkpoint's size, timed against ``safetensors.torch.load_file`` of the
raw file. (Files come from the page cache: the machine's disk is not what is measured.) Its peak
memory: a child process (glibc made to mmap large blocks, so freed memory leaves the RSS) builds
the same template state, then resumes; the growth of its peak RSS over the checkpoint's size
(1.0x: the loaded state is all a resume adds; 2.0x: the file's bytes and the tensors parsed
from them were alive together).

Distributed resume (``--distributed``, on by default): 2 ranks under torchrun, data parallel and
``fsdp="full_shard"`` through the Trainer (tests/_ckpt_read_worker.py, a ~0.9M-param MLP): bytes
each rank's resume read (``rchar`` + memory-mapped tensor reads) over the bytes it must load (every
file for data parallel; its own shard, the generators and the JSON files when sharded).

Usage: python benchmarks/checkpoint_io.py [--rounds 7] [--no-distributed]
Writes benchmarks/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import gpt2, interleave, table, write_report
from safetensors.torch import load_file, save_file

import functrain
from functrain.core import tree
from functrain.io import checkpoint as ck


def build_state():
    model = gpt2(n_layer=6, n_embd=512, n_head=8, vocab=8192, seq=128)
    state = functrain.TrainState.create(model, functrain.optim.adamw(1e-3), copy=True)
    g = torch.Generator().manual_seed(0)
    for leaf in tree.leaves(state.opt_state):  # a trained state's moments, not zeros
        if leaf.is_floating_point() and leaf.ndim:
            leaf.copy_(torch.randn(leaf.shape, generator=g).abs_())
    return model, state


def raw_tensors(model, state) -> dict:
    """The same tensors functrain writes: weights (tied ones once) + the optimizer state."""
    out = ck._dedup_state_dict(model.state_dict())
    out.update({f"opt.{p}": t.contiguous() for p, t in tree.named_leaves(state.opt_state).items()})
    return out


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn, cleanup) -> list[float]:
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    cleanup()
    return [took]


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def resume(path: str, template, model):
    found = ck.read_checkpoint(path, require_resumable=False)  # (no trainer_state.json: no Trainer here)
    bad = ck.non_finite_tensors(found)
    ck.check_optimizer_structure(found, template)
    state = ck.load_train_state(found, template, model)
    ck.load_rng_state(found)
    assert not bad
    return state


def resume_from_paths(path: str, template, model):
    """The previous sequence: verify (a hash of every file), then read the tensors from the files."""
    ck.verify_checkpoint(path, require_resumable=False)
    bad = ck.non_finite_tensors(path)
    ck.check_optimizer_structure(path, template)
    state = ck.load_train_state(path, template, model)
    ck.load_rng_state(path)
    assert not bad
    return state


def resume_peak_child(path: str) -> None:
    """Child mode: peak RSS growth of one resume of ``path`` over a freshly built template state."""
    model, state = build_state()
    _common.reset_peak_rss()
    baseline = _common.status_mb("VmRSS")
    loaded = resume(path, state, model)
    peak = _common.status_mb("VmHWM") - baseline
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(loaded), tree.leaves(state)))
    print(json.dumps({"peak_growth_mb": peak, "checkpoint_mb": folder_bytes(path) / 2**20}))


def resume_peak(path: str) -> dict:
    out = _common.run_json_child([sys.executable, __file__, "--child-resume", path])
    out["peak_growth_over_checkpoint"] = out["peak_growth_mb"] / out["checkpoint_mb"]
    print(f"resume peak RSS growth {out['peak_growth_mb']:.0f} MB for a {out['checkpoint_mb']:.0f} MB checkpoint: "
          f"{out['peak_growth_over_checkpoint']:.2f}x")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    p.add_argument("--no-distributed", dest="distributed", action="store_false")
    p.add_argument("--child-resume", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_resume:
        return resume_peak_child(a.child_resume)
    model, state = build_state()
    tensors = raw_tensors(model, state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{sum(t.numel() for t in model.parameters()) / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB of tensors")
    root = tempfile.mkdtemp(prefix="functrain-ckpt-io-")
    raw = os.path.join(root, "raw.safetensors")

    def remove_raw():
        os.remove(raw)

    def remove_ckpt():
        ck.wait_durable()  # the background fsync, outside the timing, before the next contender
        shutil.rmtree(ck.checkpoint_path(root, 1))

    def save_durable():
        ck.save_checkpoint(root, 1, model=model, train_state=state)
        ck.wait_durable()

    def raw_fsync():
        save_file(tensors, raw)
        fsync(raw)

    contenders = {
        "raw_save_file": lambda: timed(lambda: save_file(tensors, raw), remove_raw),
        "raw_save_file_fsync": lambda: timed(raw_fsync, remove_raw),
        "functrain_save": lambda: timed(lambda: ck.save_checkpoint(root, 1, model=model, train_state=state),
                                        remove_ckpt),
        "functrain_save_durable": lambda: timed(save_durable, remove_ckpt),
    }
    try:
        print("save:")
        save = interleave(contenders, a.rounds)
        print(table(save, "raw_save_file", unit="ms/save"))
        for ours, ref in (("functrain_save", "raw_save_file"), ("functrain_save_durable", "raw_save_file_fsync")):
            save[f"{ours}_over_{ref}"] = save[ours]["median_ms"] / save[ref]["median_ms"]
            print(f"{ours} / {ref}: {save[f'{ours}_over_{ref}']:.3f}x")

        path = ck.save_checkpoint(root, 1, model=model, train_state=state)
        ck.wait_durable()
        save_file(tensors, raw)
        size = folder_bytes(path)
        before = rchar()
        loaded = resume(path, state, model)
        read = rchar() - before
        assert all(torch.equal(x, y) for x, y in zip(tree.leaves(loaded), tree.leaves(state)))
        print(f"resume read {read / 2**20:.1f} MiB of a {size / 2**20:.1f} MiB checkpoint: {read / size:.3f}x")
        del loaded
        peak = resume_peak(path)
        print("load:")
        load = interleave({
            "raw_load_file": lambda: timed(lambda: load_file(raw), lambda: None),
            "functrain_resume": lambda: timed(lambda: resume(path, state, model), lambda: None),
            "functrain_resume_from_paths": lambda: timed(lambda: resume_from_paths(path, state, model), lambda: None),
        }, a.rounds)
        print(table(load, "raw_load_file", unit="ms/load"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    distributed = distributed_resume_reads() if a.distributed else None
    write_report("checkpoint_io", {
        "distributed_resume_reads": distributed,
        "config": {"params": sum(t.numel() for t in model.parameters()), "tensor_bytes": nbytes, "rounds": a.rounds},
        "save": save, "load": load,
        "resume_bytes_read": read, "checkpoint_bytes": size, "resume_read_ratio": read / size,
        "resume_peak": peak,
        "median_load_s": statistics.median([x[0] for x in load["_loadavg"]]),
    }, a.out)


def distributed_resume_reads() -> dict:
    """``{mode: [per-rank {read, share, ratio}]}`` from 2-rank Trainer resumes under torchrun."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "_ckpt_read_worker.py")
    out = {}
    for mode, fsdp in (("data_parallel", ""), ("sharded", "full_shard")):
        folder = tempfile.mkdtemp(prefix="functrain-ckpt-dist-")
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(port), worker, folder, json.dumps({"fsdp": fsdp})], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            ranks = []
            for rank in (0, 1):
                with open(os.path.join(folder, f"result-{rank}.json")) as f:
                    r = json.load(f)
                ranks.append({"rank": rank, "read": r["read"], "share": r["share"], "ratio": r["read"] / r["share"],
                              "checkpoint_bytes": r["checkpoint_bytes"]})
                print(f"{mode} rank {rank}: resume read {r['read']:,} B of its {r['share']:,} B share "
                      f"({r['read'] / r['share']:.4f}x; checkpoint {r['checkpoint_bytes']:,} B)")
            out[mode] = ranks
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
