"""The ensemble benchmark runs end to end in --quick mode and writes a sane report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ensemble_benchmark_quick(tmp_path):
    out = tmp_path / "ensemble.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ensemble.py"), "--quick", "--models", "mlp",
                           "--members", "4", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["results"]["mlp"]
    assert set(runs) == {"sequential", "population"}
    assert all(r["median_ms"] > 0 and r["peak_rss_mb"] > 0 and len(r["all_ms"]) == report["repeats"]
               for r in runs.values())
    assert runs["sequential"]["speedup_vs_sequential"] == pytest.approx(1.0)
    # Same members, same data, same math: the trained parameters agree.
    assert runs["population"]["param_checksum"] == pytest.approx(runs["sequential"]["param_checksum"], rel=1e-5)
    assert "speedup" in proc.stdout
