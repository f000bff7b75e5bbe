"""The README's two commands stay true: CI runs exactly the README's test command, and the demo command names
the demo config that exists."""

import os
import re
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands() -> list[str]:
    readme = Path(ROOT, "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    tests = _commands()[1]
    ci = Path(ROOT, ".ci", "run").read_text().splitlines()
    assert tests in ci, (tests, ci)
    assert "pytest" in tests and "--dev" in tests


def test_readme_demo_command_uses_the_demo_config():
    demo = _commands()[0]
    assert "eqvae_jax.main" in demo and "--config=configs/demo.py" in demo
    assert os.path.isfile(os.path.join(ROOT, "configs", "demo.py"))
