"""Sampling: a seed gives the same samples whatever the device count and batch size, CFG with scale 1 equals
the unguided model (also along a whole DDIM trajectory), uint8 conversion follows the reference
`custom_to_pil`, and the CLI path writes an ADM-layout npz + PNG grid from a training workdir's EMA weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import TOY_SHAPE as SHAPE
from helpers import jax_cache, tiny_dit_config, write_toy_cache

from eqvae_jax import sample as sample_cli
from eqvae_jax.diffusion import ddpm_sampling, guidance
from eqvae_jax.diffusion import sampling as sample
from eqvae_jax.diffusion.schedule import create_schedule
from eqvae_jax.models import kl_vae
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import parse_config

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("toy") / "cache")
    write_toy_cache(path)
    return path


@pytest.fixture(scope="module")
def model_and_params(toy_cache):
    """A tiny DiT whose zero-initialised output layers are randomised, so predictions are not trivial."""
    c = parse_config(tiny_dit_config(toy_cache))
    model, state, _ = dit_state.create(c.dit_config(SHAPE), c.seed, dit_state.make_optimizer(c.optim),
                                       make_mesh(1, -1), c.fsdp_min_size)
    leaves, tree = jax.tree.flatten(jax.device_get(state.params))
    rng = np.random.default_rng(1)
    leaves = [x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    return model, jax.tree.unflatten(tree, leaves)


def test_same_seed_same_samples_on_any_device_count(model_and_params):
    model, params = model_and_params
    mesh8 = make_mesh(-1, 1)
    mesh2 = make_mesh(-1, 1, devices=jax.devices()[:2])
    gen8 = sample.make_generate(model, None, mesh8, "ddpm", 5)
    gen2 = sample.make_generate(model, None, mesh2, "ddpm", 5)
    a, la = sample.generate_all(gen8, params, 7, 6, 8, mesh8)
    b, lb = sample.generate_all(gen8, params, 7, 6, 8, mesh8)
    c, lc = sample.generate_all(gen2, params, 7, 6, 4, mesh2)  # other devices, batch 4: two calls
    d, _ = sample.generate_all(gen8, params, 8, 6, 8, mesh8)
    assert a.shape == (6,) + SHAPE and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(la, lc)
    # Another batch split rounds differently, and a random DDPM's samples reach |x| ~ 1e3 over its steps: the
    # difference is judged against the samples' scale (measured up to 6e-4, i.e. 5e-7 of it).
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    assert np.abs(a - d).max() > 0.1  # another seed: other samples
    assert len({tuple(x.ravel()[:4]) for x in a}) == 6  # per-sample noise differs


def test_the_sampler_takes_the_decoders_weights_as_arguments(model_and_params):
    """Another VAE (e.g. the other arm of the replication) gives other images from the same compiled program:
    the decoder's weights and latent factors are arguments, not constants compiled into the program."""
    model, params = model_and_params
    mesh = make_mesh(-1, 1)
    vaes = [kl_vae.build(kl_vae.tiny(base_channels=8, channel_mult=(1, 2), norm_num_groups=4), seed=s) for s in (1, 2)]
    gens = [sample.make_generate(model, sample.make_decoder(v, f, 0.1), mesh, "ddim", 2) for v, f in zip(
        vaes, (0.5, 0.8), strict=True)]
    args = (params, jnp.asarray(0, jnp.uint32), jnp.arange(8, dtype=jnp.int32))
    texts = [g.func.lower(g.args[0], *args).as_text() for g in gens]
    assert texts[0] == texts[1]
    a, b = (np.asarray(g(*args)[0]) for g in gens)
    assert a.shape == (8, 16, 16, 3) and not np.array_equal(a, b)


def test_cfg_scale_one_equals_unguided(model_and_params):
    model, params = model_and_params
    cfg = model.config
    apply = lambda x, t, y: model.apply(params, x, t, y)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4,) + SHAPE), jnp.float32)
    t = jnp.asarray([10, 200, 500, 900])
    y = jnp.asarray([0, 1, 2, 3])
    plain = guidance.conditional_model_fn(apply, y)
    guided = lambda s: guidance.cfg_model_fn(apply, y, cfg.num_classes, s, cfg.in_channels)
    np.testing.assert_allclose(guided(1.0)(x, t), plain(x, t), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(guided(4.0)(x, t) - plain(x, t)).max()) > 1e-2  # guidance does act

    sched = create_schedule("10")
    run = lambda fn: ddpm_sampling.ddim_sample(sched, fn, x, jax.random.key(0))
    a, b = np.asarray(run(guided(1.0))), np.asarray(run(plain))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()  # float rounding only, along 10 steps


def test_to_uint8_is_custom_to_pil():
    x = jnp.asarray([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    ref = (255 * ((np.clip(np.asarray(x), -1.0, 1.0) + 1.0) / 2.0)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(sample.to_uint8(x)), ref)
    assert ref.tolist() == [0, 0, 0, 127, 191, 254, 255, 255]


def test_sampling_from_a_workdir_writes_adm_npz(toy_cache, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    compile_cache = jax_cache()  # the test run's one cache
    config = tiny_dit_config(toy_cache, compile_cache, total_updates=2)
    dit_job.run(config, workdir)
    overrides = {"num_samples": 5, "sampler": "ddim", "num_steps": 4, "batch_size": 8, "seed": 3}
    path = sample_cli.run_sampling(workdir, overrides)  # the run's own config, read from its checkpoint
    with np.load(path) as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8 and labels.shape == (5,)
    assert os.path.isfile(path[: -len(".npz")] + ".png")
    assert len(np.unique(images.reshape(5, -1), axis=0)) == 5
