"""Can torch.distributed.checkpoint with the pickle-free HuggingFace storage hold functrain's
sharded TrainState? (the evaluation behind docs/distributed.md "Checkpoints")

    python benchmarks/dcp_hf_storage.py

Two gloo ranks save a state dict of ``DTensor`` ``Shard(0)`` leaves (15 rows: uneven 8 + 7) and a
0-d int64 step counter with ``dcp.save(storage_writer=HuggingFaceStorageWriter(save_distributed=True,
enable_consolidation=...))``; the files are listed, reloaded on 2 ranks into ``DTensor`` templates
and in 1 process (``no_dist=True``) into plain tensors, and compared bitwise.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _full() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"params.w": torch.randn(15, 8, generator=g), "params.b": torch.randn(15, generator=g),
            "opt.mu.w": torch.randn(15, 8, generator=g), "step": torch.tensor(7)}


def rank_main(path: str, consolidate: bool, ints: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    sys.path.insert(0, ROOT)
    from functrain import distributed as fd

    fd.init_distributed()
    mesh = fd.make_mesh()
    full = {k: v for k, v in _full().items() if ints or v.is_floating_point()}
    result = {}
    try:
        dcp.save({k: fd.shard_tensor(v, mesh) for k, v in full.items()},
                 storage_writer=HuggingFaceStorageWriter(path, save_distributed=True, enable_consolidation=consolidate))
        template = {k: fd.shard_tensor(torch.zeros_like(v), mesh) for k, v in full.items()}
        dcp.load(template, storage_reader=HuggingFaceStorageReader(path))
        result["reload_same_world_equal"] = all(torch.equal(fd.to_local_full(template[k]), full[k]) for k in full)
    except Exception as e:  # the finding is the error itself
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    if fd.rank() == 0:
        with open(path + ".json", "w") as f:
            json.dump(result, f)


def one_process_reload(path: str, ints: bool) -> bool:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    full = {k: v for k, v in _full().items() if ints or v.is_floating_point()}
    template = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(template, storage_reader=HuggingFaceStorageReader(path), no_dist=True)
    return all(torch.equal(template[k], full[k]) for k in full)


def main() -> dict:
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for consolidate in (False, True):
            for ints in (False, True):
                name = f"{'consolidated' if consolidate else 'distributed'}, {'with' if ints else 'no'} int64 leaf"
                path = os.path.join(tmp, name.replace(", ", "-").replace(" ", "_"))
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                       "--master_port", str(port), __file__, "--rank", path, str(int(consolidate)),
                                       str(int(ints))], capture_output=True, text=True, env=env, timeout=300)
                if os.path.exists(path + ".json"):
                    with open(path + ".json") as f:
                        entry = json.load(f)
                else:  # the save killed the ranks: its last error line
                    errors = [line for line in proc.stderr.splitlines() if "Error:" in line and "ChildFailed" not in line]
                    entry = {"error": errors[-1].split("]: ", 1)[-1][:200] if errors else f"rc={proc.returncode}"}
                entry["files"] = sorted(os.path.relpath(p, path) for p in glob.glob(path + "/**", recursive=True)
                                        if os.path.isfile(p))
                entry["pickle_files"] = [p for p in entry["files"] if p.endswith((".metadata", ".pt", ".pkl"))]
                if "error" not in entry:
                    entry["reload_one_process_equal"] = one_process_reload(path, ints)
                report[name] = entry
                print(f"{name}: {json.dumps(entry)}", flush=True)
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], bool(int(sys.argv[3])), bool(int(sys.argv[4])))
    else:
        main()
