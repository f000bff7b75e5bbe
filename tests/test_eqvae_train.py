"""The EQ-VAE fine-tuning job end to end on 8 fake CPU devices (configs/sdvae_ft.py:tiny).

Covers: config errors before compilation, a full run (eval, checkpoints, export), exact resume after an
interruption, SIGTERM in a real process and restore on a different device count, the non-finite guard.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from eqvae_jax.train import eqvae_config, eqvae_trainer
from eqvae_jax.train.run import NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.FLAGS.mark_as_parsed()


def tiny_config(cache_dir: str):
    spec = importlib.util.spec_from_file_location("sdvae_ft", os.path.join(ROOT, "configs", "sdvae_ft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.compilation_cache_dir = cache_dir
    config.data.data_dir = os.path.join(cache_dir, "tfds")
    return config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_config_errors_are_reported_before_anything_is_built(cache_dir):
    config = tiny_config(cache_dir)
    config.optim.bse_lr = 1.0  # typo of base_lr
    config.data.global_batch_size = 12  # 8 devices
    config.transform.p_equivariance = 1.5
    config.disc.weights = "/nonexistent/disc"
    with pytest.raises(eqvae_config.ConfigError) as e:
        eqvae_config.validate(config)
    msg = str(e.value)
    assert "unknown key 'optim.bse_lr'" in msg and "did you mean 'optim.base_lr'" in msg
    assert "global_batch_size=12 is not divisible by the 8 batch shards" in msg
    assert "p_equivariance must be in [0, 1]" in msg
    assert "disc.weights='/nonexistent/disc'" in msg

    config = tiny_config(cache_dir)
    config.model.init = "weights"
    config.model.weights = ""
    with pytest.raises(eqvae_config.ConfigError, match="model.weights is empty"):
        eqvae_config.validate(config)
    config.mesh.data = 3
    with pytest.raises(eqvae_config.ConfigError, match="does not cover the 8 available devices"):
        eqvae_config.validate(config)

    config = tiny_config(cache_dir)
    config.transform.scale_numerators = [3, 5]  # on 32 px images: a 6 px and a 10 px target
    config.log.every_steps = 0
    with pytest.raises(eqvae_config.ConfigError) as e:
        eqvae_config.validate(config)
    msg = str(e.value)
    assert "log.every_steps must be >= 1" in msg
    assert "transform equivariance@3/16: a 6 px target gives the 2-layer discriminator no logits" in msg
    config = tiny_config(cache_dir)
    config.data.image_size = 36  # latent 18: 18 * 8/16 = 9 -> 18 px decoded, target 18 px: fine; 34 is not
    eqvae_config.validate(config)
    config.data.image_size = 34  # latent 17 -> 8 (16 px decoded) but the target is 17 px
    with pytest.raises(eqvae_config.ConfigError, match=r"target image is \[17, 17\] px but the decoded"):
        eqvae_config.validate(config)


def test_job_with_lpips_evaluates_checkpoints_and_exports(cache_dir, tmp_path):
    config = tiny_config(cache_dir)
    config.lpips.weights = "random"
    config.loss.perceptual_weight = 1.0
    config.total_steps = 1
    summary = eqvae_trainer.run(config, str(tmp_path / "run"))
    assert summary["steps"] == 2
    for key in ("eval_before", "eval_after"):
        assert {"eval/psnr", "eval/ssim", "eval/lpips", "eval/equivariance/rotation",
                "eval/equivariance/scale"} <= set(summary[key])
    assert os.path.isfile(os.path.join(summary["export"], "config.json"))
    assert os.path.isfile(os.path.join(summary["export"], "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(summary["reconstructions"])
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
    metrics = summary["last_metrics"]
    assert metrics["g/lpips"] > 0 and np.isfinite(metrics["g/total"]) and metrics["nonfinite_total"] == 0

    # On-demand export of a checkpoint gives the same weights as the end-of-run export.
    from safetensors.numpy import load_file

    from eqvae_jax import export

    again = export.export(str(tmp_path / "run"), dst=str(tmp_path / "again"))
    a = load_file(os.path.join(summary["export"], "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(again, "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_bit_identically(cache_dir, tmp_path):
    config = tiny_config(cache_dir)
    config.log.eval_batches = 0
    full = eqvae_trainer.run(config, str(tmp_path / "full"))
    assert full["steps"] == 8 and full["g_variants"] <= 3 and full["d_variants"] <= 3
    part = eqvae_trainer.run(config, str(tmp_path / "resumed"), stop_after=4)
    assert part["stopped"] == 4
    resumed = eqvae_trainer.run(config, str(tmp_path / "resumed"))
    assert resumed["start_step"] == 4 and resumed["steps"] == 8
    assert leaves_equal(full["state"], resumed["state"])
    metrics = full["last_metrics"]
    comparable = [k for k in metrics if k.startswith(("g/", "d/", "branch_"))]
    assert comparable and {k: metrics[k] for k in comparable} == {k: resumed["last_metrics"][k] for k in comparable}


def test_sigterm_saves_a_checkpoint_that_restores_on_another_device_count(cache_dir, tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny", f"--workdir={workdir}",
           "--config.total_steps=100000", "--config.checkpoint.every_steps=100000",
           f"--config.compilation_cache_dir={cache_dir}", f"--config.data.data_dir={cache_dir}/tfds",
           "--config.log.eval_batches=0", "--config.log.images=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 600
    for line in proc.stdout:  # wait until every variant compiled and steps are running
        lines.append(line)
        if "lowres@8/16" in line and "g_step" in line:
            break
        assert time.time() < deadline, "".join(lines[-20:])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by request" in log
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps, log[-3000:]
    stopped = steps[-1]

    config = tiny_config(cache_dir)  # this process has 8 devices; the checkpoint was written on 2
    config.total_steps = stopped // config.optim.accumulate + 1
    config.log.eval_batches = 0
    summary = eqvae_trainer.run(config, workdir)
    assert summary["start_step"] == stopped
    assert summary["steps"] == config.total_steps * config.optim.accumulate
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
    config = tiny_config(cache_dir)
    config.checkpoint.every_steps = 2
    config.max_consecutive_nonfinite = 2
    config.log.eval_batches = 0
    real = eqvae_trainer.build_train_iterator
    monkeypatch.setattr(eqvae_trainer, "build_train_iterator", lambda *a, **k: NaNAfter(real(*a, **k), 2))
    with pytest.raises(NonFiniteError, match="consecutive steps had non-finite"):
        eqvae_trainer.run(config, str(tmp_path / "nan"))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "nan" / "checkpoints") if s.isdigit())
    assert steps == [2]

    # The guard itself: a NaN batch leaves every parameter and optimizer state untouched.
    job = eqvae_trainer.build_job(config)
    before = jax.tree.map(np.asarray, (job.state.vae, job.state.opt_g))
    plan, rot, _ = eqvae_trainer.draw(job, 0)
    images = jnp.full((8, 32, 32, 3), jnp.nan)
    state, metrics, _ = job.steps.generator(job.state, job.lpips_state, images, rot, jax.random.key(0), plan)
    assert leaves_equal(before, (state.vae, state.opt_g))
    assert int(state.nonfinite_run) == 1 and float(metrics["g/finite"]) == 0.0 and int(state.step) == 1
