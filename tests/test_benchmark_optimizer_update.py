"""The optimizer-update benchmark runs end to end in --quick mode and writes a sane report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_optimizer_update_benchmark_quick(tmp_path):
    out = tmp_path / "optimizer_update.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "optimizer_update.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    expected = {"functrain eager", "functrain compiled", "functrain compiled+donated", "functrain flat compiled+donated",
                "functrain flat eager+donated", "functrain flat eager+donated, 8 pieces", "torch foreach", "torch fused",
                "copy (bandwidth)", "triad (bandwidth)"}
    assert set(report["results"]) == expected
    assert all(r["median_ms"] > 0 and len(r["all_ms"]) == report["repeats"] for r in report["results"].values())
    assert report["results"]["torch fused"]["ratio_vs_fused"] == pytest.approx(1.0)
    assert report["relative_difference_vs_fused"] < 1e-5  # the timed functrain update is AdamW
    assert report["relative_difference_flat_vs_fused"] < 1e-5
    assert "vs fused" in proc.stdout
    results = report["results"]
    assert all(r["gb_per_s"] > 0 for r in results.values())
    assert results["copy (bandwidth)"]["fraction_of_copy_bandwidth"] is None
    fused = results["torch fused"]
    assert fused["fraction_of_copy_bandwidth"] == pytest.approx(
        fused["gb_per_s"] / results["copy (bandwidth)"]["gb_per_s"])
