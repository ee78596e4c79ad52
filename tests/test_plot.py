import json

import pytest
from PIL import Image

from functrain.cli import main
from functrain.io.plot import FIGURE_DPI, FIGURE_SIZE_INCHES, read_log_history


def _write_run(run_dir, n=20):
    rows = []
    for step in range(1, n + 1):
        rows.append({"step": step, "loss": 5.0 / step, "learning_rate": 1e-3 * step / n, "grad_norm": 1.0 + step})
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 4.0 / step, "eval_accuracy": step / n})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_plot_command_writes_png_of_expected_size(tmp_path):
    _write_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size == (FIGURE_SIZE_INCHES[0] * FIGURE_DPI, FIGURE_SIZE_INCHES[1] * FIGURE_DPI)
        # Not a blank canvas: the curves put many distinct colours on it.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_plot_reads_trainer_state_of_newest_checkpoint(tmp_path):
    for step, loss in [(5, 3.0), (10, 2.0)]:
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step, "loss": loss}]}))
    assert read_log_history(tmp_path) == [{"step": 10, "loss": 2.0}]


def test_plot_tolerates_truncated_last_line(tmp_path):
    rows = _write_run(tmp_path, n=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert read_log_history(tmp_path) == rows


def test_plot_missing_logs_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no logs" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_log_history(tmp_path / "nope")
