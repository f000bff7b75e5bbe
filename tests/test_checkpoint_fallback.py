"""Damaged checkpoints and rejected resumes, on the tiny DiT job over the toy latent cache (the cheapest job to
compile): a newest step damaged three ways (a truncated array file, a missing OCDBT manifest, a missing iterator
state) is moved aside as `<step>.damaged` with one warning and the run resumes from the previous step, ending
bit-identical to an uninterrupted run; the real command does so without a traceback on stderr; when no step
restores it exits 1 with one short message listing each step and moves nothing; a resume rejected for a changed
config leaves WORKDIR/config.json as it was."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from helpers import REPO, jax_cache, tiny_dit_config, write_toy_cache

from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.loop import ResumeError

pytestmark = pytest.mark.slow
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(toy cache, compile cache, a finished 4-update run with checkpoints 2 and 4, its final state)."""
    root = tmp_path_factory.mktemp("fallback")
    cache, compile_cache = str(root / "cache"), jax_cache()
    write_toy_cache(cache)
    run = str(root / "straight")
    state = dit_job.run(tiny_dit_config(cache, compile_cache), run)["state"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]
    return cache, compile_cache, run, jax.device_get(state)


def _copy_run(straight: str, dst: str) -> str:
    shutil.copytree(os.path.join(straight, "checkpoints"), os.path.join(dst, "checkpoints"))
    return dst


def _truncate_array_file(step_dir: str) -> None:
    largest = max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(1000)


DAMAGE = {
    "truncated_array_file": _truncate_array_file,
    "missing_manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "missing_iterator_state": lambda d: os.remove(f"{d}/data/process_0-of-1.json"),
}


def _assert_same(a, b) -> None:
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _main(cache: str, compile_cache: str, workdir: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/dit.py:tiny", f"--workdir={workdir}",
            f"--config.latents.cache_dir={cache}", f"--config.compilation_cache_dir={compile_cache}", *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("damage", ["missing_manifest", "missing_iterator_state"])
def test_damaged_newest_step_is_moved_aside_and_the_run_resumes_from_the_previous(toy, damage, tmp_path):
    cache, compile_cache, straight, final = toy
    run = _copy_run(straight, str(tmp_path / "run"))
    DAMAGE[damage](f"{run}/checkpoints/4")
    summary = dit_job.run(tiny_dit_config(cache, compile_cache), run)
    assert summary["start_update"] == 2 and int(summary["state"].step) == 4
    _assert_same(final, jax.device_get(summary["state"]))
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["2", "4", "4.damaged"]


def test_the_command_falls_back_from_a_truncated_array_file_without_tracebacks(toy, tmp_path):
    cache, compile_cache, straight, final = toy
    run = _copy_run(straight, str(tmp_path / "run"))
    DAMAGE["truncated_array_file"](f"{run}/checkpoints/4")
    result = _main(cache, compile_cache, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]  # no asyncio / TensorStore tracebacks
    warnings = [line for line in result.stdout.splitlines() if "does not restore" in line]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "4.damaged" in warnings[0], result.stdout
    assert "resumed at update 2" in result.stdout
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["2", "4", "4.damaged"]
    resumed = Checkpointer(f"{run}/checkpoints").restore(4, final)
    _assert_same(final, jax.device_get(resumed.state))


def test_no_step_restores_one_message_exit_1_nothing_moved(toy, tmp_path):
    cache, compile_cache, straight, _ = toy
    run = _copy_run(straight, str(tmp_path / "run"))
    DAMAGE["missing_manifest"](f"{run}/checkpoints/4")
    DAMAGE["missing_iterator_state"](f"{run}/checkpoints/2")
    result = _main(cache, compile_cache, run)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr[-3000:]
    assert lines[0].startswith("error: no checkpoint in") and "nothing was moved" in lines[0]
    assert "step 4: state/manifest.ocdbt missing" in lines[1]
    assert "step 2: data/process_0-of-1.json missing" in lines[2]
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["2", "4"]


def test_rejected_resume_leaves_the_saved_config(toy, tmp_path):
    cache, compile_cache, straight, _ = toy
    run = _copy_run(straight, str(tmp_path / "run"))
    shutil.copy(f"{straight}/config.json", f"{run}/config.json")
    before = Path(run, "config.json").read_text()
    changed = tiny_dit_config(cache, compile_cache, **{"model.overrides": {"depth": 3, "hidden_size": 32,
                                                                           "num_heads": 2}})
    with pytest.raises(ResumeError, match="resuming with a different config.*model.*the saved config"):
        dit_job.run(changed, run)
    assert Path(run, "config.json").read_text() == before
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["2", "4"]
