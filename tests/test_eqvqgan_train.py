"""The EQ-VQGAN job (trainer 'eqvqgan', configs/vqgan_ft.py:tiny) end to end on 8 fake CPU devices, through the
shared run loop that `python -m eqvae_jax.main` calls: config checks, an interrupted run that resumes, codebook
usage in the log rows, the VQ equivariance monitoring (pre-quantization features, code agreement under
rotations), and the end-of-run taming export, loaded strictly by taming's own modules (tests/torch_refs)."""

import os

import jax
import numpy as np
import pytest
import torch
import vq_refs as refs
from absl import flags
from flax import nnx
from helpers import jax_cache, load_config, tiny_eqvqgan_config

from eqvae_jax import main as main_module
from eqvae_jax.convert import vq_vae as convert_vq_vae
from eqvae_jax.models import vq_vae, weights
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eqvae.config import EQVQGANConfig, parse_config
from eqvae_jax.train.metrics_file import read_metrics
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return jax_cache()


def test_config_checks_name_the_family_and_the_scale_grid(cache_dir):
    assert main_module.JOBS["eqvqgan"] == "eqvae_jax.train.eqvae.job"
    parsed = parse_config(tiny_eqvqgan_config(cache_dir))
    assert isinstance(parsed, EQVQGANConfig) and parsed.model.kind == "vq_vae" and parsed.loss.reduction == "mean"

    config = tiny_eqvqgan_config(cache_dir, **{"model.kind": "kl_vae"})
    with pytest.raises(ConfigError, match="model.kind='kl_vae', but trainer 'eqvqgan' fine-tunes a 'vq_vae'"):
        parse_config(config)
    config = tiny_eqvqgan_config(cache_dir, **{"transform.scale_denominator": 32,
                                               "transform.scale_numerators": [5, 8]})
    with pytest.raises(ConfigError, match=r"scale_numerators \[5\] over 32 do not fit the 16 px latent"):
        parse_config(config)

    # The full recipe (f16 at 256 px, scales k/16) is consistent: only its missing weight directories are reported.
    with pytest.raises(ConfigError) as e:
        parse_config(load_config("vqgan_ft"))
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 3 and all("weights" in p for p in problems), str(e.value)


def test_interrupted_run_resumes_logs_codebook_usage_and_exports_a_taming_checkpoint(cache_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_eqvqgan_config(cache_dir, total_updates=2, **{"checkpoint.every_updates": 1,
                                                                 "transform.p_lowres": 0.0})
    part = eqvae_job.run(config, workdir, stop_after=1)
    assert part["stopped"] == 1 and "taming export" not in part["outputs"]
    summary = eqvae_job.run(config, workdir)
    assert summary["start_update"] == 1 and summary["updates"] == 2 and int(summary["state"].step) == 4

    # Codebook usage of each log interval's quantized codes (summed over its micro-steps), and the branch mix.
    rows = [r for r in read_metrics(workdir) if "g/total" in r]
    assert [r["update"] for r in rows] == [1, 2]
    n_embed = parse_config(config).model.model_config().n_embed
    for r in rows:
        assert 1 / n_embed <= r["codebook/usage"] <= 1 and 1 <= r["codebook/perplexity"] <= n_embed
        assert r["g/codebook_loss"] > 0 and np.isfinite(r["g/total"])
    assert sum(r["branch_g/equivariance"] for r in rows) > 0  # the EQ branch was drawn and trained

    # Monitoring at the start (first run) and the end (resumed run): the error on pre-quantization features per
    # transform family, the fraction of code indices that commute with rotations, codebook usage.
    assert set(part["evals"]) == {0} and set(summary["evals"]) == {2}
    for results in (part["evals"][0], summary["evals"][2]):
        assert results["eval/equivariance/rotation"] > 0 and results["eval/equivariance/scale"] > 0
        assert 0 <= results["eval/equivariance/codes/rotation"] <= 1
        assert 0 < results["eval/codebook_usage"] <= 1 and results["eval/images"] == 2
    assert part["evals"][0]["eval/equivariance/rotation"] != summary["evals"][2]["eval/equivariance/rotation"]

    # The end-of-run export: taming's last.ckpt + model.yaml, loaded strictly into taming's Encoder, Decoder and
    # VectorQuantizer2 with exactly the trained weights (WORKDIR/export/flax holds them too), which then quantize
    # and decode as the Flax model does.
    export = summary["outputs"]["taming export"]
    assert export == f"{workdir}/export/taming" and sorted(os.listdir(export)) == ["last.ckpt", "model.yaml"]
    trained = vq_vae.load(f"{workdir}/export/flax")
    flat = weights.flat_variables(trained, nnx.Param)
    state_flat = {weights.path_key(p): np.asarray(v.get_value()) for p, v in
                  nnx.to_flat_state(jax.device_get(summary["state"].vae))}
    assert flat.keys() == state_flat.keys() and all(np.array_equal(flat[k], state_flat[k]) for k in flat)
    cfg = convert_vq_vae.config_from_taming_yaml(os.path.join(export, "model.yaml"))
    assert cfg == trained.config
    sd = torch.load(os.path.join(export, "last.ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    ref = refs.TamingVQModel(cfg).eval()
    ref.load_state_dict(sd, strict=True)  # every key, every shape
    want = convert_vq_vae.flax_to_torch(flat, cfg)
    assert sd.keys() == want.keys() and all(np.array_equal(sd[k].numpy(), want[k]) for k in sd)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    got, theirs = refs.jax_outputs(trained, x), refs.taming_outputs(ref, x)
    assert refs.max_err(got["latents"], theirs["latents"]) <= refs.TOL
    assert np.mean(got["indices"] == theirs["indices"]) >= 0.95  # (exact-tie differences aside)
    with torch.no_grad():
        decoded = ref.decode(torch.from_numpy(got["quantized"].transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert refs.max_err(got["decoded"], decoded) <= refs.TOL
