"""The layers as an enforced contract: imports point down only (import-linter, configured in
pyproject.toml), and no layer imports another layer's private names."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "functrain"


def _lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # import-linter analyses the package importable from cwd; run it as a module so the
    # interpreter (and its site-packages) is this test's.
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_layers_point_down():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "KEPT" in result.stdout


def test_contract_catches_an_upward_import(tmp_path):
    """A deliberate bad import (the core reaching up into the Trainer) breaks the contract."""
    shutil.copytree(PACKAGE, tmp_path / "functrain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "functrain" / "core" / "tree.py"
    bad.write_text(bad.read_text() + "\nfrom functrain.trainer import trainer as _upward  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "functrain.core.tree -> functrain.trainer" in result.stdout


@pytest.mark.parametrize("path", ["functrain.optim", "functrain.schedules", "functrain.step", "functrain.trainer"])
def test_public_import_paths_still_work(path):
    import importlib

    module = importlib.import_module(path)
    expected = {"functrain.optim": "adamw", "functrain.schedules": "get_schedule",
                "functrain.step": "make_train_step", "functrain.trainer": "Trainer"}[path]
    assert hasattr(module, expected)
