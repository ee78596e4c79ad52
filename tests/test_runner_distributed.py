"""The runner on 2 CPU processes (gloo, torchrun): data-parallel step, one checkpoint writer, logs
and evaluation reduced across ranks, resume; equal to the same run in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from functrain.io import checkpoint as ck

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_distributed import LAUNCH_TIMEOUT, _env, free_port  # noqa: E402


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_runner_data_parallel_matches_one_process_and_resumes(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(HERE, "_runner_dist_worker.py"), str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import _runner_dist_worker

    before = torch.get_num_threads()
    try:
        _runner_dist_worker.main(str(one))  # the reference: one process, the whole global batch
    finally:
        torch.set_num_threads(before)

    a, b = load_file(str(two / "final.safetensors")), load_file(str(one / "final.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # The checkpoint of the stop (4) and the periodic ones: written once, by rank 0.
    assert [s for s, _ in ck.checkpoint_dirs(str(two / "ck"))] == [3, 4, 6, 8]
    logs_two, logs_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    # One line per log (rank 0 writes), the resumed run's lines after step 4 only.
    assert [(r["step"], sorted(r)) for r in logs_two] == [(r["step"], sorted(r)) for r in logs_one]
    assert all(isinstance(r["eval_loss"], float) for r in logs_one if "eval_loss" in r)  # finite (NaN is text)
    for x, y in zip(logs_two, logs_one):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
