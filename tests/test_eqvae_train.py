"""The EQ-VAE fine-tuning job end to end on 8 fake CPU devices (configs/sdvae_ft.py:tiny).

Covers: config errors before compilation, a full run (eval, checkpoints, export), exact resume after an
interruption, SIGTERM in a real process and restore on a different device count, the non-finite guard.
"""

import logging
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from cpu_devices import xla_flags
from helpers import EQ_ONE_MICRO_STEP, REPO, config_flags, jax_cache, leaves_equal, tiny_eqvae_config

from eqvae_jax.losses import equivariance
from eqvae_jax.train.eqvae import family
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eqvae.config import parse_config
from eqvae_jax.train.guard import NonFiniteError
from eqvae_jax.train.metrics_file import read_metrics
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
pytestmark = pytest.mark.slow
SUITE_SECONDS = 250  # rough wall time on 2 cores: conftest starts the longest modules first


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return jax_cache()


def test_config_errors_are_reported_before_anything_is_built(cache_dir):
    config = tiny_eqvae_config(cache_dir)
    config.optim.bse_lr = 1.0  # typo of base_lr
    config.global_batch_size = 12  # 8 devices
    config.transform.p_equivariance = 1.5
    config.disc.weights = "/nonexistent/disc"
    with pytest.raises(ConfigError) as e:
        parse_config(config)
    msg = str(e.value)
    assert "unknown key 'optim.bse_lr'" in msg and "did you mean 'optim.base_lr'" in msg
    assert "global_batch_size=12 is not divisible by the 8 batch shards" in msg
    assert "p_equivariance must be in [0, 1]" in msg
    assert "disc.weights='/nonexistent/disc'" in msg

    config = tiny_eqvae_config(cache_dir)
    config.model.init = "weights"
    config.model.weights = ""
    with pytest.raises(ConfigError, match="model.weights is empty"):
        parse_config(config)
    config.mesh.data = 3
    with pytest.raises(ConfigError, match="does not cover the 8 available devices"):
        parse_config(config)

    config = tiny_eqvae_config(cache_dir)
    config.transform.scale_numerators = [3, 5]  # on 32 px images: a 6 px and a 10 px target
    config.log.every_updates = 0
    with pytest.raises(ConfigError) as e:
        parse_config(config)
    msg = str(e.value)
    assert "log.every_updates must be positive, got 0" in msg
    assert "transform equivariance@3/16: a 6 px target gives the 2-layer discriminator no logits" in msg
    config = tiny_eqvae_config(cache_dir)
    config.data.image_size = 36  # latent 18: 18 * 8/16 = 9 -> 18 px decoded, target 18 px: fine; 34 is not
    parse_config(config)
    config.data.image_size = 34  # latent 17 -> 8 (16 px decoded) but the target is 17 px
    with pytest.raises(ConfigError, match=r"target image is \[17, 17\] px but the decoded"):
        parse_config(config)


def test_main_reports_a_config_error_with_status_2(cache_dir, tmp_path):
    cmd = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny", f"--workdir={tmp_path}",
           "--config.model.init=weights", "--config.model.weights=/nowhere", "--config.optim.accumulate=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=xla_flags(2)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "model.weights: /nowhere is not an eqvae-jax weights" in proc.stderr
    assert "optim.accumulate must be positive" in proc.stderr


def test_job_with_lpips_evaluates_checkpoints_and_exports(cache_dir, tmp_path):
    config = tiny_eqvae_config(cache_dir, total_updates=1)
    config.lpips.weights = "random"
    config.loss.perceptual_weight = 1.0
    summary = eqvae_job.run(config, str(tmp_path / "run"))
    assert summary["updates"] == 1 and int(summary["state"].step) == 2  # 2 micro-steps per update
    assert set(summary["evals"]) == {0, 1}
    for results in summary["evals"].values():
        assert {"eval/psnr", "eval/ssim", "eval/lpips", "eval/equivariance/rotation",
                "eval/equivariance/scale"} <= set(results)
    export = summary["outputs"]["diffusers export"]
    assert os.path.isfile(os.path.join(export, "config.json"))
    assert os.path.isfile(os.path.join(export, "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(summary["outputs"]["reconstructions"])
    assert os.listdir(tmp_path / "run" / "tensorboard")
    rows = read_metrics(str(tmp_path / "run"))  # the JSON twin of the TensorBoard scalars
    assert [r["update"] for r in rows if "g/total" in r] == [1] and {0, 1} <= {r["update"] for r in rows
                                                                                if "eval/psnr" in r}
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]
    metrics = summary["last_metrics"]
    assert metrics["g/lpips"] > 0 and np.isfinite(metrics["g/total"]) and metrics["nonfinite"] == 0

    # On-demand export of a checkpoint gives the same weights as the end-of-run export.
    from safetensors.numpy import load_file

    from eqvae_jax import export as export_cli

    again = export_cli.export(str(tmp_path / "run"), dst=str(tmp_path / "again"))
    a = load_file(os.path.join(export, "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(again, "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_bit_identically(cache_dir, tmp_path, caplog):
    config = tiny_eqvae_config(cache_dir, **{"eval.batches": 0, "eval.images": 0})
    with caplog.at_level(logging.INFO, logger="eqvae_jax"):
        full = eqvae_job.run(config, str(tmp_path / "full"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("update ")]
    # The compiling first update is left out of rate and ETA; LPIPS (weight 0 in :tiny) has no column.
    assert "compiling: first update took" in lines[0] and "ETA" not in lines[0], lines
    assert "upd/s" in lines[1] and "ETA" in lines[1] and "compiling" not in lines[1], lines
    assert not any("lpips" in line for line in lines) and "d_weight" in lines[1], lines
    assert full["updates"] == 4 and full["g_variants"] <= 3 and full["d_variants"] <= 3
    part = eqvae_job.run(config, str(tmp_path / "resumed"), stop_after=2)
    assert part["stopped"] == 2
    resumed = eqvae_job.run(config, str(tmp_path / "resumed"))
    assert resumed["start_update"] == 2 and resumed["updates"] == 4
    assert leaves_equal(full["state"], resumed["state"])
    metrics = full["last_metrics"]
    comparable = [k for k in metrics if k.startswith(("g/", "d/", "branch_"))]
    assert comparable and {k: metrics[k] for k in comparable} == {k: resumed["last_metrics"][k] for k in comparable}

    changed = tiny_eqvae_config(cache_dir, total_updates=6, **{"optim.accumulate": 1})
    with pytest.raises(ValueError, match="resuming with a different config.*optim.accumulate: checkpoint 2"):
        eqvae_job.run(changed, str(tmp_path / "resumed"))


def test_compiling_ahead_runs_the_same_programs_as_compiling_on_first_call(cache_dir, tmp_path):
    lazy = eqvae_job.run(tiny_eqvae_config(cache_dir, total_updates=2, **{"compile.ahead": False, "eval.batches": 0,
                                                                          "eval.images": 0}), str(tmp_path / "lazy"))
    config = tiny_eqvae_config(cache_dir, total_updates=2, **{"eval.batches": 0, "eval.images": 0})
    ahead = eqvae_job.run(config, str(tmp_path / "ahead"))
    assert lazy["compiled_ahead"] == 0
    assert ahead["compiled_ahead"] == ahead["g_variants"] + ahead["d_variants"] > 0  # every variant from the pool
    assert leaves_equal(lazy["state"], ahead["state"])


def test_sigterm_saves_a_checkpoint_that_restores_on_another_device_count(cache_dir, tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny", f"--workdir={workdir}",
           "--config.total_updates=100000", "--config.checkpoint.every_updates=100000",
           f"--config.compilation_cache_dir={cache_dir}", f"--config.data.data_dir={cache_dir}/tfds",
           "--config.eval.batches=0", "--config.eval.images=0", "--config.log.every_updates=1000",
           *config_flags(EQ_ONE_MICRO_STEP)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 600
        for line in proc.stdout:  # wait until the generator's program compiled and steps are running
            lines.append(line)
            if "equivariance@8/16" in line and "g_step: new compiled variant" in line:
                break
            assert time.time() < deadline, "".join(lines[-20:])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a 100000-update run behind
            proc.kill()
            proc.wait()
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    assert "eqvae: stopped at update" in log
    assert "I0000" not in log and "orbax" not in log.lower()  # library INFO logs are off by default
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps, log[-3000:]
    stopped = steps[-1]

    config = tiny_eqvae_config(cache_dir, total_updates=stopped + 1, **{"eval.batches": 0, **EQ_ONE_MICRO_STEP})
    summary = eqvae_job.run(config, workdir)  # this process has 8 devices; the checkpoint was written on 2
    assert summary["start_update"] == stopped and summary["updates"] == stopped + 1
    assert len(summary["state"].step.sharding.device_set) == 8


class NaNAfter:
    """Wraps the training iterator: images become NaN from the `n`-th batch on (everything else delegated)."""

    def __init__(self, it, n: int):
        self._it, self._n, self._count = it, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._count += 1
        if self._count > self._n:
            batch = dict(batch, image=batch["image"] * jnp.nan)
        return batch

    def __getattr__(self, name):
        return getattr(self._it, name)


def test_nonfinite_steps_are_skipped_then_the_run_stops_without_a_new_checkpoint(cache_dir, tmp_path, monkeypatch):
    config = tiny_eqvae_config(cache_dir, max_consecutive_nonfinite=2, **{"checkpoint.every_updates": 1,
                                                                           "eval.batches": 0})
    real = eqvae_job.build_train_iterator
    monkeypatch.setattr(eqvae_job, "build_train_iterator", lambda *a, **k: NaNAfter(real(*a, **k), 2))
    with pytest.raises(NonFiniteError, match="consecutive steps had non-finite"):
        eqvae_job.run(config, str(tmp_path / "nan"))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "nan" / "checkpoints") if s.isdigit())
    assert steps == [1]  # micro-steps 3 and 4 (update 2) were NaN: update 2 is not saved

    # The guard itself: a NaN batch leaves every parameter and optimizer state untouched.
    built = eqvae_job.build(parse_config(config))
    before = jax.tree.map(np.asarray, (built.state.vae, built.state.opt_g))
    plan, rot = equivariance.Draw(equivariance.Branch.PLAIN, (1, 1), 1).plan((32, 32))
    images = jnp.full((8, 32, 32, 3), jnp.nan)
    state, metrics, _ = built.steps.generator(built.state, built.lpips_state, images, rot, jax.random.key(0), plan)
    assert leaves_equal(before, (state.vae, state.opt_g))
    assert float(metrics["g/nonfinite"]) == 1.0 and int(state.step) == 1


def test_progress_columns_of_switched_off_terms_are_left_out(cache_dir):
    c = parse_config(tiny_eqvae_config(cache_dir, **{"loss.perceptual_weight": 1.0, "lpips.weights": "random"}))
    run = types.SimpleNamespace(config=c, family=family.KL)
    labels = lambda scalars: [label for label, _ in eqvae_job.FinetuneRun.console_fields(run, scalars)]
    assert {"lpips", "d_weight", "d"} <= set(labels({"g/disc_factor": 1.0}))
    assert "lpips" in labels({"g/disc_factor": 0.0}) and not {"d_weight", "d"} & set(labels({"g/disc_factor": 0.0}))
    run.config = parse_config(tiny_eqvae_config(cache_dir))  # :tiny: LPIPS weight 0
    assert "lpips" not in labels({"g/disc_factor": 1.0})
