"""Resume reads each byte of the checkpoint once in every process (2 ranks, data parallel and
sharded): each rank reads, verifies and keeps its part (the whole checkpoint when every rank loads
all of it; its own shard, the generators and the JSON files of a sharded one) and loads from those
bytes. A bad part on any rank is refused on every rank. Worker: tests/_ckpt_read_worker.py."""

import json
import os
import subprocess
import sys

import pytest

from test_distributed import LAUNCH_TIMEOUT, _env, check, free_port

pytestmark = pytest.mark.distributed

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ckpt_read_worker.py")


def torchrun_worker(out_dir, opts):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           WORKER, str(out_dir), json.dumps(opts)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())


def _results(out_dir):
    out = []
    for rank in (0, 1):
        with open(os.path.join(out_dir, f"result-{rank}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.mark.parametrize("fsdp, resume", [("", True), ("full_shard", "path")], ids=["data_parallel", "sharded"])
def test_resume_reads_each_rank_share_once(tmp_path, fsdp, resume):
    opts = {"fsdp": fsdp, "resume": resume if resume is True else str(tmp_path / "run" / "checkpoint-2"),
            "corrupt": bool(fsdp)}
    check(torchrun_worker(tmp_path, opts))
    for r in _results(tmp_path):
        share = r["share"]  # all files (data parallel); its shard, the generators and the JSON (sharded)
        assert r["equal"] and r["global_step"] == 2  # the saved state, bitwise
        # Each byte once (JSON read by the Trainer, headers: < 1%); reading twice would be >= 1.5x.
        assert share <= r["read"] <= 1.05 * share, (r["rank"], r["read"], share)
        if fsdp:  # the other rank's shard is not read here; rank 1 takes rank 0's plain leaves (44 B)
            assert r["share"] < 0.6 * r["checkpoint_bytes"] and r["disk_tensor_bytes"] < 1000
            after = r["after_corruption"]
            assert "(rank 1)" in after["error"] and "fails its checksum" in after["error"], after
            assert after["newest_valid"] is None
