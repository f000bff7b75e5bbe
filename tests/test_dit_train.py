"""DiT/SiT training on a latent cache (8 fake devices, FSDP): the loss falls on a toy latent set, an
interrupted (stop request) and resumed run equals an uninterrupted one bit for bit, a non-finite step is not
applied, block params are never sharded along their scanned depth axis, and bad configs are rejected."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from jax.sharding import PartitionSpec

from eqvae_jax.data import latent_cache
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train import dit_config, dit_state, dit_trainer, run
from eqvae_jax.train.dit_steps import make_loss_fn, make_train_step
from eqvae_jax.train.eqvae_config import ConfigError

flags.FLAGS.mark_as_parsed()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 4)


def write_toy_cache(cache_dir: str, n: int = 16, classes: int = 4) -> None:
    """n records: class c has a fixed smooth pattern as mean and a small std (a learnable toy set)."""
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((classes,) + SHAPE).astype(np.float32)
    records = []
    for i in range(n):
        c = i % classes
        moments = np.concatenate([patterns[c], np.full(SHAPE, 0.05, np.float32)], axis=-1)
        records.append(latent_cache.encode_record(i, c, False, moments, "float32"))
    vae = {"init": "random", "preset": "tiny", "seed": 0, "dtype": "float32", "weights": "",
           "overrides": {"channel_mult": [1, 2, 2, 2], "base_channels": 16, "norm_num_groups": 8},
           "scaling_factor": 0.0, "shift_factor": None}
    latent_cache.write_meta(cache_dir, {"num_chunks": 1, "latent_shape": list(SHAPE), "dtype": "float32",
                                        "scaling_factor": 1.0, "shift_factor": 0.0, "vae": vae})
    latent_cache.write_chunk(latent_cache.chunk_path(cache_dir, 0, 1), records)


def job_config(name: str, cache_dir: str, compile_cache: str = "", **changes):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.latents.cache_dir = cache_dir
    config.compilation_cache_dir = compile_cache
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("toy") / "cache")
    write_toy_cache(path)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent XLA cache for the session: runs with identical programs compile once."""
    return str(tmp_path_factory.getbasetemp() / "jax_cache")


def _eval_loss(config, params) -> float:
    """Loss on all 16 toy latents (means) at 8 fixed noise/time draws, no label dropout."""
    meta = latent_cache.read_meta(config.latents.cache_dir)
    cfg = dit_config.dit_model_config(config, tuple(meta["latent_shape"]))
    model, _, _ = dit_state.create(cfg, config, make_mesh(1, -1))
    loss_fn = jax.jit(make_loss_fn(model, config.objective), static_argnums=(4,))
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((4,) + SHAPE).astype(np.float32)
    z = jnp.asarray(np.tile(patterns, (4, 1, 1, 1)))
    y = jnp.tile(jnp.arange(4), 4)
    return float(np.mean([loss_fn(params, z, y, jax.random.key(k), False)[0] for k in range(8)]))


@pytest.mark.parametrize("job", ["dit_b2", "sit_b2"])
def test_loss_falls_on_toy_latents(job, toy_cache, compile_cache, tmp_path):
    config = job_config(job, toy_cache, compile_cache, total_steps=40,
                        **{"log.every_steps": 20, "checkpoint.every_steps": 40})
    mesh = make_mesh(1, -1)
    cfg = dit_config.dit_model_config(config, SHAPE)
    _, initial, _ = dit_state.create(cfg, config, mesh)
    before = _eval_loss(config, initial.params)
    final = dit_trainer.run(config, str(tmp_path / "run"))
    after = _eval_loss(config, final.params)
    assert int(final.step) == 40
    assert after < 0.9 * before, (before, after)


def test_stopped_and_resumed_run_equals_uninterrupted(toy_cache, compile_cache, tmp_path, monkeypatch):
    config = job_config("dit_b2", toy_cache, compile_cache, total_steps=4)
    straight = dit_trainer.run(config, str(tmp_path / "straight"))

    class StopAtTwo(run.StopRequest):
        def should_stop(self, step: int) -> bool:
            return step == 2

    monkeypatch.setattr(run, "StopRequest", StopAtTwo)
    stopped = dit_trainer.run(config, str(tmp_path / "resumed"))
    assert int(stopped.step) == 2
    monkeypatch.undo()
    resumed = dit_trainer.run(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(straight))
    flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(resumed))
    assert len(flat_a) == len(flat_b)
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    kernel = lambda s: np.asarray(s.params["blocks"]["attn"]["qkv"]["kernel"])
    assert not np.array_equal(kernel(stopped), kernel(straight))  # steps 3-4 did change the params

    deeper = {"depth": 3, "hidden_size": 32, "num_heads": 2}
    changed = job_config("dit_b2", toy_cache, compile_cache, total_steps=6, **{"model.overrides": deeper})
    with pytest.raises(ValueError, match="resuming with a different model"):
        dit_trainer.run(changed, str(tmp_path / "resumed"))


def test_nonfinite_step_is_not_applied(toy_cache):
    config = job_config("dit_b2", toy_cache)
    mesh = make_mesh(1, -1)
    cfg = dit_config.dit_model_config(config, SHAPE)
    model, state, shardings = dit_state.create(cfg, config, mesh)
    step = make_train_step(model, dit_state.make_optimizer(config), config, 1.0, 0.0, mesh, shardings)
    batch = {"mean": jnp.zeros((8,) + SHAPE).at[0, 0, 0, 0].set(jnp.nan), "std": jnp.ones((8,) + SHAPE),
             "label": jnp.zeros(8, jnp.int32)}
    before = jax.device_get(state)
    new, metrics = step(state, batch, jax.random.key(0))
    after = jax.device_get(new)
    assert float(metrics["finite"]) == 0.0 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.ema),
                    jax.tree.leaves(after.params) + jax.tree.leaves(after.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    good = dict(batch, mean=jnp.zeros((8,) + SHAPE))
    new, metrics = step(new, good, jax.random.key(0))
    assert float(metrics["finite"]) == 1.0


def test_fsdp_rules_keep_the_depth_axis_whole():
    config = dit_config.defaults()
    abstract = jax.eval_shape(
        lambda: dit_state._split(dit_config.dit_model_config(config, (32, 32, 4)), 0)[1])
    mesh = make_mesh(1, -1)
    shardings = dit_state.dit_param_shardings(abstract, mesh, config.fsdp_min_size)
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
    config = job_config("sit_b2", toy_cache)
    config.optim.learning_rate = 1.0
    config.sample.sampler = "ddpm"
    config.global_batch_size = 12
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'optim.learning_rate'.*not divisible.*does not fit"):
        dit_config.validate(config)
    config = job_config("dit_xl2", "")
    with pytest.raises(ConfigError, match="latents.cache_dir is empty"):
        dit_config.validate(config)
