"""Where a notebook runs: the test-mode flag, the accelerator, the repository checkout, Colab's file helpers.

Test mode (`EQVAE_NOTEBOOK_TEST=1`, set by tests/test_notebooks.py): every download is replaced by a tiny
random-weight model made locally in the layout of the real one (hub.py), and the notebooks pick their
`test` settings (few images, few updates), so a notebook runs end to end offline in a minute or two on a CPU.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, TypeVar

import jax

import eqvae_jax

TEST_ENV = "EQVAE_NOTEBOOK_TEST"
T = TypeVar("T")


def test_mode() -> bool:
    """True when the notebooks run under the test suite (offline, tiny models, short loops)."""
    return os.environ.get(TEST_ENV, "") == "1"


def mode() -> str:
    """'test', 'accelerator' (a TPU or GPU backend: e.g. Colab's one v5e chip) or 'cpu'."""
    if test_mode():
        return "test"
    return "accelerator" if jax.default_backend() in ("tpu", "gpu") else "cpu"


def pick(*, test: T, cpu: T, accelerator: T) -> T:
    """The settings for the current `mode()`."""
    return {"test": test, "cpu": cpu, "accelerator": accelerator}[mode()]


def describe() -> str:
    """One line: JAX version, backend, devices, and the settings picked."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"jax {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) ({', '.join(kinds)}); "
            f"settings: {mode()}")


def repo_path(*parts: str) -> str:
    """A file of the git checkout the package was installed from (configs/ is not part of the package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(eqvae_jax.__file__)))
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.path.join(*parts)} not found beside the eqvae_jax package in {root}: the "
                                "notebooks need a git checkout (git clone REPO_URL; pip install -e CHECKOUT).")
    return path


def colab_files() -> Any | None:
    """`google.colab.files` on Colab (upload/download), else None."""
    try:
        from google.colab import files  # Colab only
    except ImportError:
        return None
    return files


def offer_download(path: str) -> str:
    """Zip a directory (or take a file) and start the browser download on Colab; returns the file's path."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"nothing to download: {path} does not exist.")
    if os.path.isdir(path):
        path = shutil.make_archive(path, "zip", root_dir=path)
    files = colab_files()
    if files is not None:
        files.download(path)
    return path


def upload() -> dict[str, bytes]:
    """Files the user picks in Colab's upload dialog ({name: bytes}); {} outside Colab or in test mode."""
    files = colab_files()
    if files is None or test_mode():
        print("no upload dialog here (not on Colab): using the embedded demo photographs")
        return {}
    return dict(files.upload())
