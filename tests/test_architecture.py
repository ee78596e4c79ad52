"""The layers as an enforced contract: imports point down only (import-linter, configured in
pyproject.toml), and no layer imports another layer's private names."""

import ast
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


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def _private_imports_across_layers(path: pathlib.Path) -> list[str]:
    """``from functrain.x import _name`` and ``alias._name`` where alias is another layer's module."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = _layer(module)
    tree = ast.parse(path.read_text())
    found, foreign_modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("functrain."):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _is_module(target):
                    if _layer(target) != own:
                        foreign_modules.add(a.asname or a.name)
                elif a.name.startswith("_") and _layer(node.module) != own:
                    found.append(f"{module}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in foreign_modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_layer_imports_another_layers_private_names():
    offenders = [line for p in sorted(PACKAGE.rglob("*.py")) for line in _private_imports_across_layers(p)]
    assert not offenders, "private names imported across layers:\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", ["functrain.optim", "functrain.schedules", "functrain.step", "functrain.trainer"])
def test_public_import_paths_still_work(path):
    import importlib

    module = importlib.import_module(path)
    expected = {"functrain.optim": "adamw", "functrain.schedules": "get_schedule",
                "functrain.step": "make_train_step", "functrain.trainer": "Trainer"}[path]
    assert hasattr(module, expected)


def test_no_merge_conflict_markers_left_in_the_tree():
    """A conflict resolved by hand can leave markers inside a docstring or a Markdown page, where
    nothing else fails; many branches merge into this tree."""
    root = pathlib.Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")
    found = []
    for name in tracked.stdout.splitlines():
        path = root / name
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg", ".yaml", ".yml") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
            if line.startswith(markers[0]) or line == markers[1] or line.startswith(markers[2]):
                found.append(f"{name}:{i}")
    assert not found, f"merge conflict markers: {found}"
