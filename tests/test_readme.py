"""The README's hand-loop quick start runs as written and trains."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_hand_loop_quick_start_runs_and_learns(capsys):
    hand_loop = _python_blocks()[0]
    assert "make_train_step" in hand_loop
    namespace = {}
    exec(compile(hand_loop, str(README), "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == 20
    printed = capsys.readouterr().out.split("\n")
    first_loss, last_loss = float(printed[0].split()[1]), float(metrics["loss"])
    assert last_loss < first_loss  # it trained (counting sequences are learnable)


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(line.strip() for line in README.read_text().splitlines() if "pytest" in line and "pip" in line)
    assert test_command in ci
