"""`python -m eqvae_jax.data`: runs a job's input pipeline alone on the demo set, with TensorFlow blocked."""

import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocks `import tensorflow` (TFDS would use it if importable), then runs the CLI as `python -m` would.
_RUN = """
import importlib.abc, importlib.util, runpy, sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTensorFlow())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "tensorflow" else _find_spec(name, *a)
sys.argv = ["eqvae_jax.data"] + sys.argv[1:]
runpy.run_module("eqvae_jax.data", run_name="__main__", alter_sys=True)
"""


def test_cli_prints_throughput_and_skips_and_writes_a_grid(tmp_path):
    grid = tmp_path / "grid.png"
    args = [
        "--config=tests/configs/data_only.py",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.image_size=24",
        "--batches=2",
        f"--grid={grid}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", _RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s per host:" in result.stdout
    assert "skipped: {'unreadable': 0, 'corrupt': 0, 'truncated': 0, 'too_small': 0" in result.stdout
    assert Image.open(grid).size == (3 * 24, 3 * 24)  # 8 images tiled 3 x 3
    assert os.path.isdir(tmp_path / "tfds" / "eqvae_demo" / "1.0.0")
