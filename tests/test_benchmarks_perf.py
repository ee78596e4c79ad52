"""The performance benchmarks (issue 8, targets 2-7 and the GPU script) run end to end in
``--quick`` mode and write reports with the expected keys. Never asserts on time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, tmp_path, *extra, expect_rc=0):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    report = json.loads(out.read_text()) if expect_rc == 0 else None
    if report is not None:
        assert report["benchmark"] == name and report["quick"] is True
        assert {"torch", "threads", "cpu_count", "loadavg_at_start"} <= set(report["machine"])
    return report, proc


def _medians_positive(results, names):
    assert set(names) <= set(results)
    for n in names:
        assert results[n]["median_ms"] > 0 and results[n]["n"] == len(results[n]["all_ms"])


@pytest.mark.slow
def test_train_step_quick(tmp_path):
    report, proc = run_script("train_step", tmp_path, "--only", "functrain", "HF Trainer compiled")
    _medians_positive(report["results"], ["functrain", "compiled hand loop", "HF Trainer compiled",
                                          "HF Trainer compiled loop"])
    assert "hand loop" not in report["results"]  # --only: the reference and the contenders named
    assert report["results"]["compiled hand loop"]["ratio_vs_compiled hand loop"] == pytest.approx(1.0)
    assert {"functrain_vs_compiled_hand", "HF Trainer compiled_vs_compiled_hand"} <= set(report["summary"])
    assert len(report["loadavg_per_round"]) == report["rounds"]
    assert "vs compiled hand loop" in proc.stdout


@pytest.mark.slow
def test_overhead_step_quick(tmp_path):
    report, _ = run_script("overhead_step", tmp_path)
    _medians_positive(report["results"], ["functrain", "functrain pure", "hand loop"])
    assert report["summary"]["functrain_vs_hand"] > 0
    assert report["summary"]["functrain_flat_vs_hand"] > 0


@pytest.mark.slow
def test_memory_quick(tmp_path):
    # The eager variants only: the compiled ones are the same code path with compile=True.
    report, _ = run_script("memory", tmp_path, "--only", "hand loop", "functrain donated eager")
    res = report["results"]
    assert set(res) == {"hand loop", "functrain donated eager"}
    for r in res.values():
        assert 0 < r["baseline_rss_mb"] <= r["train_peak_rss_mb"] <= r["peak_rss_mb"] + 1e-6
    assert res["hand loop"]["train_peak_vs_hand"] == pytest.approx(1.0)


@pytest.mark.slow
def test_compile_cost_quick(tmp_path):
    report, _ = run_script("compile_cost", tmp_path)
    for name in ("cold", "warm"):
        r = report["results"][name]
        assert r["first_step_s"] > 0 and len(r["runs"]) == report["rounds"]
    assert report["results"]["cold"]["runs"][0]["loss"] == pytest.approx(report["results"]["warm"]["runs"][0]["loss"])
    assert report["summary"]["warm_vs_cold"] > 0


@pytest.mark.slow
def test_driver_overhead_quick(tmp_path):
    report, _ = run_script("driver_overhead", tmp_path)
    _medians_positive(report["results"], ["Trainer.train() step", "bare compiled step"])
    assert {"overhead_us", "paired_median_overhead_us"} <= set(report["summary"])


@pytest.mark.slow
def test_loop_overhead_quick(tmp_path):
    report, _ = run_script("loop_overhead", tmp_path)
    assert report["trainer_has_runner"] is True and len(report["loadavg_per_round"]) == 1
    for name in ("bare loop", "run()", "Trainer"):
        assert report["median_us"][name]["cpu"] > 0 and report["median_us"][name]["wall"] > 0
    assert set(report["overhead_over_bare_loop_us"]) == {"run()", "Trainer"}


@pytest.mark.slow
def test_resume_position_quick(tmp_path):
    report, _ = run_script("resume_position", tmp_path)
    hf = report["results"]["hf_skip_first_batches"]
    assert len(hf["median_s_by_k"]) == 3 and "slope_s_per_1000" in hf and "extrapolated_s" in hf
    assert report["results"]["functrain"]["median_s"] > 0
    assert report["summary"]["target_s"] == 1.0


@pytest.mark.slow
def test_streaming_resume_quick(tmp_path):
    report, _ = run_script("streaming_resume", tmp_path)
    assert report["bitwise_equal"] is True and len(report["loadavg_per_round"]) == report["rounds"]
    for name in ("datasets", "torch"):
        assert report["summary"][name]["stream_state_s"] > 0 and report["summary"][name]["skip_s"] > 0
    assert report["summary"]["datasets_workers2_stream_state_s"] > 0


def test_resume_position_slope_fit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from resume_position import slope

    a, b = slope([1000, 2000, 4000], [0.5 + 2e-4 * k for k in (1000, 2000, 4000)])
    assert a == pytest.approx(0.5) and b == pytest.approx(2e-4)


def test_gpu_step_without_cuda_exits_with_a_clear_message(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the no-CUDA message does not apply")
    _, proc = run_script("gpu_step", tmp_path, expect_rc=2)
    assert "needs CUDA" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu_step.json").exists()


def test_gpu_step_argument_parsing():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_step

    args = gpu_step.parse_args(["--batch", "16", "--seq", "512", "--only", "functrain", "HF Trainer"])
    assert (args.batch, args.seq, args.only, args.peak_tflops) == (16, 512, ["functrain", "HF Trainer"], 989.0)
    assert gpu_step.model_config(args) == dict(n_layer=12, n_embd=768, n_head=12, vocab=50304, seq=512)
    quick = gpu_step.parse_args(["--quick", "--dry-run"])
    assert quick.dry_run and quick.seq <= 32 and quick.rounds == 1
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--batch", "0"])
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--only", "nonsense"])


@pytest.mark.slow
def test_gpu_step_dry_run_quick(tmp_path):
    report, _ = run_script("gpu_step", tmp_path, "--dry-run")
    assert report["device"] == "cpu" and report["dry_run"] is True
    for name in ("functrain", "hand loop compiled", "HF Trainer"):
        r = report["results"][name]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["first_step_s"] > 0
    assert {"functrain_vs_hf_tokens_per_s", "functrain_mfu"} <= set(report["summary"])


@pytest.mark.slow
def test_trainer_memory_quick(tmp_path):
    report, proc = run_script("trainer_memory", tmp_path)
    eager = report["results"]["eager"]
    assert {"transformers", "functrain"} <= set(eager)
    for v in ("transformers", "functrain"):
        runs = eager[v]["runs"]
        assert len(runs) == report["rounds"] and all("loadavg" in r and r["peak_rss_mb"] > 0 for r in runs)
    assert eager["growth_ratio"] == pytest.approx(eager["functrain"]["growth_mb"] / eager["transformers"]["growth_mb"])
    assert "target <= 1.05x" in proc.stdout
    for run in eager["functrain"]["runs"]:  # per phase: before the first step, each step, after each step
        phases = [p["phase"] for p in run["phases"]]
        assert phases[:3] == ["before the first step", "step 1", "after step 1"]
        assert phases[-1] == f"after step {report['steps']}"
        assert run["growth_mb"] == max(p["peak_mb"] for p in run["phases"])


@pytest.mark.slow
def test_trainer_step_quick(tmp_path):
    report, proc = run_script("trainer_step", tmp_path)
    assert report["mode"] == "eager" and set(report["medians"]) == {"hf", "functrain"}
    assert all(m["step_ms"] > 0 and m["loop_ms"] > 0 for m in report["medians"].values())
    assert report["ratio_step"] == pytest.approx(report["medians"]["functrain"]["step_ms"] / report["medians"]["hf"]["step_ms"])
    assert "vs HF" in proc.stdout


@pytest.mark.slow
def test_trainer_step_compiled_quick(tmp_path):
    report, proc = run_script("trainer_step", tmp_path, "--compiled")
    assert report["mode"] == "compiled" and set(report["medians"]) == {"hf", "functrain", "hand"}
    assert report["ratio_step_vs_compiled_hand"] == pytest.approx(
        report["medians"]["functrain"]["step_ms"] / report["medians"]["hand"]["step_ms"])
    assert "compiled hand loop" in proc.stdout


@pytest.mark.slow
def test_step_variants_quick(tmp_path):
    report, proc = run_script("step_variants", tmp_path, "flat")
    _medians_positive(report["results"], ["hand", "flat"])
    assert report["results"]["flat"]["max_abs_param_diff_vs_hand"] < 1e-5  # same numbers as torch's fused AdamW
    assert "vs hand" in proc.stdout


@pytest.mark.slow
def test_step_floor_quick(tmp_path):
    report, proc = run_script("step_floor", tmp_path)
    _medians_positive(report["results"], ["compiled hand loop", "functrain split"])
    hand = report["profiles"]["compiled hand loop"]
    assert hand["ms"]["matmul"] > 0 and hand["ms"]["compiled kernels"] > 0 and hand["matmul_calls"]
    assert all(key.startswith("aten::") for key in hand["matmul_calls"])
    s = report["summary"]
    assert 0 < s["matmul_and_attention_share_of_step"] < 1
    assert s["step_matmul_gflop"] > 0 and s["machine_matmul_gflops"] > 0
    assert s["target_must_remove_ms"] == pytest.approx(s["compiled_hand_loop_ms"] * 0.05)
