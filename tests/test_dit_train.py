"""DiT/SiT training on a latent cache (8 fake devices, FSDP): the loss falls on a toy latent set, an
interrupted and resumed run equals an uninterrupted one bit for bit, a profiled run writes its trace and equals
an unprofiled one, a non-finite step is not applied, block params are never sharded along their scanned depth
axis, and bad configs are rejected."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import TOY_SHAPE, jax_cache, leaves_equal, tiny_dit_config, toy_patterns, write_toy_cache
from jax.sharding import PartitionSpec

from eqvae_jax.models import dit
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import defaults, parse_config
from eqvae_jax.train.dit.steps import latent_factors, make_loss_fn, make_train_step
from eqvae_jax.typed_config import ConfigError, parse

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("toy") / "cache")
    write_toy_cache(path)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent XLA cache for the session: runs with identical programs compile once."""
    return jax_cache()


def _create(config):
    c = parse_config(config)
    return c, dit_state.create(c.dit_config(TOY_SHAPE), c.seed, dit_state.make_optimizer(c.optim),
                               make_mesh(1, -1), c.fsdp_min_size)


def _eval_loss(config, params) -> float:
    """Loss on all 16 toy latents (means) at 8 fixed noise/time draws, no label dropout."""
    c, (model, _, _) = _create(config)
    loss_fn = jax.jit(make_loss_fn(model, c.objective), static_argnums=(4,))
    z = jnp.asarray(np.tile(toy_patterns(), (4, 1, 1, 1)))
    y = jnp.tile(jnp.arange(4), 4)
    return float(np.mean([loss_fn(params, z, y, jax.random.key(k), False)[0] for k in range(8)]))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ddpm", "sit"])
def test_loss_falls_on_toy_latents(objective, toy_cache, compile_cache, tmp_path):
    config = tiny_dit_config(toy_cache, compile_cache, objective, total_updates=40,
                             **{"log.every_updates": 20, "checkpoint.every_updates": 40})
    _, (_, initial, _) = _create(config)
    before = _eval_loss(config, initial.params)
    final = dit_job.run(config, str(tmp_path / "run"))["state"]
    after = _eval_loss(config, final.params)
    assert int(final.step) == 40
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted(toy_cache, compile_cache, tmp_path):
    config = tiny_dit_config(toy_cache, compile_cache, total_updates=4)
    straight = dit_job.run(config, str(tmp_path / "straight"))["state"]
    stopped = dit_job.run(config, str(tmp_path / "resumed"), stop_after=2)
    assert stopped["stopped"] == 2 and int(stopped["state"].step) == 2
    resumed = dit_job.run(config, str(tmp_path / "resumed"))
    assert resumed["start_update"] == 2 and int(resumed["state"].step) == 4
    flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(straight))
    flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(resumed["state"]))
    assert len(flat_a) == len(flat_b)
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    kernel = lambda s: np.asarray(s.params["blocks"]["attn"]["qkv"]["kernel"])
    assert not np.array_equal(kernel(stopped["state"]), kernel(straight))  # updates 3-4 did change the params

    deeper = {"depth": 3, "hidden_size": 32, "num_heads": 2}
    changed = tiny_dit_config(toy_cache, compile_cache, total_updates=6, **{"model.overrides": deeper})
    with pytest.raises(ValueError, match="resuming with a different config.*model"):
        dit_job.run(changed, str(tmp_path / "resumed"))


@pytest.mark.slow
def test_profiled_run_writes_a_trace_and_equals_an_unprofiled_one(toy_cache, compile_cache, tmp_path):
    config = tiny_dit_config(toy_cache, compile_cache, total_updates=2)
    plain = dit_job.run(config, str(tmp_path / "plain"))["state"]
    profiled_config = tiny_dit_config(toy_cache, compile_cache, total_updates=2,
                                      **{"profile.first_update": 1, "profile.num_updates": 2})
    profiled = dit_job.run(profiled_config, str(tmp_path / "profiled"))["state"]
    runs = glob.glob(str(tmp_path / "profiled" / "profile" / "plugins" / "profile" / "*"))
    assert len(runs) == 1, runs
    assert glob.glob(f"{runs[0]}/*.xplane.pb") and glob.glob(f"{runs[0]}/*.trace.json.gz"), os.listdir(runs[0])
    assert not os.path.exists(tmp_path / "plain" / "profile")
    assert int(profiled.step) == 2
    assert leaves_equal(jax.device_get(plain), jax.device_get(profiled))
    with pytest.raises(ConfigError, match=r"(?s)profile.num_updates must be >= 0.*profile.first_update must be >= 1"):
        parse_config(tiny_dit_config(toy_cache, **{"profile.first_update": 0, "profile.num_updates": -1}))
    with pytest.raises(ConfigError, match="profile.first_update=3 is after total_updates=2"):
        parse_config(tiny_dit_config(toy_cache, total_updates=2, **{"profile.first_update": 3,
                                                                    "profile.num_updates": 1}))


def test_nonfinite_step_is_not_applied(toy_cache):
    config = tiny_dit_config(toy_cache)
    c, (model, state, shardings) = _create(config)
    mesh = make_mesh(1, -1)
    step = make_train_step(model, dit_state.make_optimizer(c.optim), c, mesh, shardings)
    factors = latent_factors(1.0, 0.0)
    batch = {"mean": jnp.zeros((8,) + TOY_SHAPE).at[0, 0, 0, 0].set(jnp.nan), "std": jnp.ones((8,) + TOY_SHAPE),
             "label": jnp.zeros(8, jnp.int32)}
    before = jax.device_get(state)
    new, metrics = step(state, batch, jax.random.key(0), factors)
    after = jax.device_get(new)
    assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.ema),
                    jax.tree.leaves(after.params) + jax.tree.leaves(after.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    good = dict(batch, mean=jnp.zeros((8,) + TOY_SHAPE))
    new, metrics = step(new, good, jax.random.key(0), factors)
    assert float(metrics["nonfinite"]) == 0.0


def test_fsdp_rules_keep_the_depth_axis_whole():
    c = parse_config(defaults(), check_cache=False)
    cfg = c.dit_config((32, 32, 4))
    abstract = jax.eval_shape(lambda: dit.functional(dit.build(cfg))[1])
    shardings = dit_state.state_shardings(abstract, make_mesh(1, -1), c.fsdp_min_size)
    qkv = shardings["blocks"]["attn"]["qkv"]["kernel"].spec
    assert abstract["blocks"]["attn"]["qkv"]["kernel"].shape == (28, 1152, 3456)
    assert qkv[0] is None and "fsdp" in tuple(qkv)
    assert shardings["blocks"]["attn"]["qkv"]["bias"].spec == PartitionSpec(None, "fsdp")  # 28 x 3456
    assert shardings["final_layer"]["linear"]["bias"].spec == PartitionSpec()  # small: replicated
    sharded = sum(int(np.prod(x.shape)) for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings),
                                                         strict=True) if "fsdp" in tuple(s.spec))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert total == pytest.approx(675e6, rel=0.01) and sharded / total > 0.99


def test_config_validation(toy_cache):
    config = tiny_dit_config(toy_cache, objective="sit")
    config.optim.learning_rate = 1.0
    config.sample.sampler = "ddpm"
    config.global_batch_size = 12
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'optim.learning_rate'.*not divisible.*does not fit"):
        parse_config(config)
    with pytest.raises(ConfigError, match="latents.cache_dir is empty"):
        parse_config(tiny_dit_config(""))
    assert parse(type(parse_config(defaults(), check_cache=False)), defaults()).model.size == "XL"
