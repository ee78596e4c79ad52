"""Loss and metric curves from a run folder, as one PNG (``functrain plot RUN_DIR``).

The curves come from the run's logs: ``metrics.jsonl`` (one JSON object per logging event) when
present, else the ``log_history`` of the newest ``trainer_state.json`` (the run folder's own, or the
newest ``checkpoint-N`` folder's). Matplotlib is an optional dependency (``pip install
functrain[plot]``), imported only here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

FIGURE_SIZE_INCHES = (12, 8)
FIGURE_DPI = 100  # 1200 x 800 pixels


def read_log_history(run_dir: str | Path) -> list[dict]:
    """The list of logged dicts of a run (each has a ``step``), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        lines = jsonl.read_text().splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a truncated last line: keep what is whole.
                if n == len(lines):
                    break
                raise ValueError(f"{jsonl}: line {n} is not valid JSON") from None
        return rows
    for state_file in _trainer_state_candidates(run_dir):
        history = json.loads(state_file.read_text()).get("log_history", [])
        if history:
            return history
    raise FileNotFoundError(
        f"no logs in {str(run_dir)!r}: expected metrics.jsonl or a trainer_state.json "
        "(in the folder or in a checkpoint-N subfolder)"
    )


def _trainer_state_candidates(run_dir: Path) -> list[Path]:
    found = []
    if (run_dir / "trainer_state.json").is_file():
        found.append(run_dir / "trainer_state.json")
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    for ckpt in sorted(checkpoints, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if (ckpt / "trainer_state.json").is_file():
            found.append(ckpt / "trainer_state.json")
    return found


def _series(history: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in row:
            xs.append(row["step"])
            ys.append(value)
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to ``out`` (default ``RUN_DIR/curves.png``); return the path.

    Panels: training and evaluation loss; learning rate; other ``eval_*`` metrics; gradient norm
    and throughput. Panels without data say so instead of disappearing, so the layout is stable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_log_history(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    keys = {k for row in history for k in row}
    eval_metrics = sorted(k for k in keys if k.startswith("eval_") and k not in ("eval_loss",)
                          and not k.endswith(("_runtime", "_per_second")))

    fig, axes = plt.subplots(2, 2, figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    _panel(axes[0][0], history, ["loss", "eval_loss"], "loss", log_y=True)
    _panel(axes[0][1], history, ["learning_rate"], "learning rate")
    _panel(axes[1][0], history, eval_metrics, "evaluation metrics")
    _panel(axes[1][1], history, ["grad_norm"], "gradient norm")
    fig.suptitle(f"functrain run: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=FIGURE_DPI)
    plt.close(fig)
    return out


def _panel(ax, history, keys, title, log_y=False):
    drawn = False
    for key in keys:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if drawn:
        ax.legend()
        if log_y and all(y > 0 for k in keys for y in _series(history, k)[1]):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
