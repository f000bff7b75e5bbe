"""MaskGIT training on a token cache (8 fake devices, FSDP) and sampling from its workdir. The production path end
to end: tokens extracted from the demo photographs (configs/extract_tokens.py:tiny) -> configs/maskgit.py:tiny
trains on them -> an interrupted and resumed run (with EMA) equals an uninterrupted one bit for bit ->
`python -m eqvae_jax.sample` writes an ADM npz + PNG (the same samples on 8 and on 2 devices) -> `python -m
eqvae_jax.eval_samples` scores it with a tiny random Inception. Also: the loss falls on a learnable toy token set, a
non-finite step is not applied, v1's warm-up and weight decay, block params never sharded along their scanned
depth axis, bad configs rejected."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from helpers import (
    TOY_GRID,
    jax_cache,
    load_config,
    tiny_maskgit_config,
    toy_token_grids,
    write_toy_cache,
    write_toy_token_cache,
    xla_optimized,
)
from jax.sharding import NamedSharding, PartitionSpec

from eqvae_jax import eval_samples
from eqvae_jax import sample as sample_cli
from eqvae_jax.data import latent_cache
from eqvae_jax.diffusion.sampling import generate_all
from eqvae_jax.eval import inception
from eqvae_jax.maskgit import sampling
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.latents import job as extraction
from eqvae_jax.train.maskgit import job as maskgit_job
from eqvae_jax.train.maskgit import state as mg_state
from eqvae_jax.train.maskgit.config import OptimConfig, defaults, parse_config
from eqvae_jax.train.maskgit.steps import make_loss_fn, make_train_step
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
HOST = {"codebook_size": 64, "token_shape": list(TOY_GRID)}


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("toy") / "tokens")
    write_toy_token_cache(path)
    return path


@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory) -> str:
    """configs/extract_tokens.py:tiny on the demo photographs: 7 images x 2 crops x 2 flips, crops stored."""
    path = str(tmp_path_factory.mktemp("demo") / "tokens")
    config = load_config("extract_tokens", "tiny", **{"data.data_dir": str(tmp_path_factory.mktemp("tfds"))})
    extraction.run(config, path)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent XLA cache for the session: runs with identical programs compile once."""
    return jax_cache()


def _config(toy_cache, compile_cache="", **changes):
    return tiny_maskgit_config(toy_cache, compile_cache, **{"ema.enabled": True, "ema.decay": 0.9, **changes})


def _create(config):
    c = parse_config(config)
    return c, mg_state.create(maskgit_job.model_config(c, HOST), c.seed, mg_state.make_optimizer(c.optim),
                              make_mesh(1, -1), c.fsdp_min_size, c.ema.enabled)


def _eval_loss(config, params) -> float:
    """Loss on the 4 toy grids x 4 at 8 fixed masking/dropout draws."""
    c, (model, _, _) = _create(config)
    loss_fn = jax.jit(make_loss_fn(model, c))
    tokens = jnp.asarray(np.tile(toy_token_grids(), (4, 1, 1)))
    labels = jnp.tile(jnp.arange(4), 4)
    return float(np.mean([loss_fn(params, tokens, labels, jax.random.key(k))[0] for k in range(8)]))


@pytest.fixture(scope="module")
def trained(demo_tokens, compile_cache, tmp_path_factory):
    """An uninterrupted 4-update run with EMA on the demo tokens: the reference of the resume test and the workdir
    sampled from."""
    workdir = str(tmp_path_factory.mktemp("maskgit") / "straight")
    return workdir, maskgit_job.run(_config(demo_tokens, compile_cache, total_updates=4), workdir)["state"]


@pytest.mark.slow
def test_loss_falls_on_toy_tokens(toy_cache, compile_cache, tmp_path):
    config = _config(toy_cache, compile_cache, total_updates=40, **{"log.every_updates": 20,
                                                                   "checkpoint.every_updates": 40})
    _, (_, initial, _) = _create(config)
    before = _eval_loss(config, initial.params)
    with xla_optimized():  # 40 updates of one program: faster with XLA's optimizations (quiet: 29 -> 20 s)
        summary = maskgit_job.run(config, str(tmp_path / "run"))
    after = _eval_loss(config, summary["state"].params)
    print(f"toy tokens: loss {before:.3f} -> {after:.3f}, accuracy {summary['last_metrics']['accuracy']:.3f}")
    assert int(summary["state"].step) == 40 and summary["last_metrics"]["nonfinite"] == 0
    assert after < 0.6 * before, (before, after)
    assert summary["last_metrics"]["accuracy"] > 0.2  # 13x chance (1 / 64): the toy grids are being learnt


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted(trained, demo_tokens, compile_cache, tmp_path):
    _, straight = trained
    config = _config(demo_tokens, compile_cache, total_updates=4)
    stopped = maskgit_job.run(config, str(tmp_path / "resumed"), stop_after=2)
    assert stopped["stopped"] == 2 and int(stopped["state"].step) == 2
    resumed = maskgit_job.run(config, str(tmp_path / "resumed"))
    assert resumed["start_update"] == 2 and int(resumed["state"].step) == 4
    flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(straight))
    flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(resumed["state"]))
    assert len(flat_a) == len(flat_b) and straight.ema is not None
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    kernel = lambda s: np.asarray(s.params["blocks"]["attn"]["mha"]["in_proj"]["kernel"])
    assert not np.array_equal(kernel(stopped["state"]), kernel(straight))  # updates 3-4 did change the params
    with pytest.raises(ValueError, match="resuming with a different config.*model"):
        maskgit_job.run(_config(demo_tokens, compile_cache, total_updates=6, **{"model.class_token_first": True}),
                        str(tmp_path / "resumed"))


def test_nonfinite_step_is_not_applied(toy_cache):
    config = _config(toy_cache, **{"optim.warmup_updates": 0})
    c, (model, state, shardings) = _create(config)
    # NaN in the largest weight (integer tokens cannot carry one): loss and gradients are NaN, the step skipped.
    leaves, treedef = jax.tree.flatten(state.params)
    largest = max(range(len(leaves)), key=lambda i: leaves[i].size)
    leaves[largest] = leaves[largest] * jnp.nan
    state = state.replace(params=jax.tree.unflatten(treedef, leaves))
    step = make_train_step(model, mg_state.make_optimizer(c.optim), c, make_mesh(1, -1), shardings)
    batch = {"tokens": jnp.asarray(np.tile(toy_token_grids(), (2, 1, 1))), "label": jnp.tile(jnp.arange(4), 2)}
    before = jax.device_get(state)
    new, metrics = step(state, batch, jax.random.key(0))
    after = jax.device_get(new)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"])) and int(after.step) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.ema, before.opt_state)),
                    jax.tree.leaves((after.params, after.ema, after.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here


def test_warmup_then_constant_and_decay_on_every_parameter():
    o = OptimConfig()
    lr = mg_state.learning_rate(o)
    assert [float(lr(s)) for s in (0, 1, 1250, 2500, 100_000)] == pytest.approx([0.0, 4e-8, 5e-5, 1e-4, 1e-4], rel=1e-3)
    tx = mg_state.make_optimizer(OptimConfig(warmup_updates=0, grad_clip=1.0))
    params = {"norm": {"scale": jnp.ones(3)}, "w": jnp.full((2,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # no gradient: only AdamW's decoupled decay
    np.testing.assert_allclose(updates["norm"]["scale"], -1e-4 * 1e-5 * 1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["w"], -1e-4 * 1e-5 * 2.0, rtol=1e-6)
    big = {"norm": {"scale": jnp.full(3, 1e3)}, "w": jnp.full((2,), 1e3)}
    _, clipped = tx.update(big, tx.init(params), params)
    assert float(optax.global_norm(clipped[1][0].mu)) == pytest.approx(0.1 * 1.0, rel=1e-5)  # mu = (1 - b1) * clipped


def test_fsdp_rules_keep_the_depth_axis_whole():
    c = parse_config(defaults(), check_cache=False)
    cfg = c.maskgit_config(1024, 16)
    abstract = mg_state.abstract_state(cfg, mg_state.make_optimizer(c.optim), make_mesh(1, -1), c.fsdp_min_size,
                                       ema=True)
    kernel = abstract.params["blocks"]["attn"]["mha"]["in_proj"]["kernel"]
    assert kernel.shape == (24, 768, 2304) and kernel.sharding.spec[0] is None and "fsdp" in tuple(kernel.sharding.spec)
    assert abstract.opt_state[1][0].mu["blocks"]["attn"]["mha"]["in_proj"]["kernel"].sharding == kernel.sharding
    # 2026 x 768: 2026 rows do not split over 8 devices, the width does
    assert abstract.ema["tok_emb"]["embedding"].sharding.spec == PartitionSpec(None, "fsdp")
    assert abstract.params["first_layer"]["norm_0"]["scale"].sharding.spec == PartitionSpec()  # small: replicated
    leaves = jax.tree.leaves(abstract.params)
    total = sum(int(np.prod(x.shape)) for x in leaves)
    sharded = sum(int(np.prod(x.shape)) for x in leaves if "fsdp" in tuple(x.sharding.spec))
    assert total == pytest.approx(174e6, rel=0.01) and sharded / total > 0.99


def test_config_validation(toy_cache, tmp_path):
    config = tiny_maskgit_config(toy_cache)
    config.optim.learning_rate = 1.0
    config.objective.loss_on = "unmasked"
    config.sample.steps = 1
    config.global_batch_size = 12
    config.model.preset = "giant"
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'optim.learning_rate'.*not divisible.*preset 'giant'.*"
                                          r"loss_on must be one of.*at least 2 steps"):
        parse_config(config)
    with pytest.raises(ConfigError, match="tokens.cache_dir is empty"):
        parse_config(tiny_maskgit_config(""))
    write_toy_cache(str(tmp_path / "latents"))
    with pytest.raises(ConfigError, match="holds moments .* not tokens"):
        parse_config(tiny_maskgit_config(str(tmp_path / "latents")))
    with pytest.raises(ConfigError, match="needs a model trained with label drop"):
        parse_config(tiny_maskgit_config(toy_cache, **{"objective.label_drop": 0.0}))
    variant = parse_config(load_config("maskgit", "chang,tiny", **{"tokens.cache_dir": toy_cache}))
    assert (variant.objective.schedule, variant.objective.loss_on) == ("cosine", "masked")
    assert maskgit_job.model_config(variant, HOST).class_token_first
    paper = parse_config(load_config("maskgit", "batch=256"), check_cache=False)
    assert (paper.global_batch_size, paper.total_updates) == (256, 1_501_200)


def test_sample_then_evaluate(trained, demo_tokens, tmp_path):
    workdir, _ = trained
    overrides = {"num_samples": 20, "batch_size": 16, "seed": 3}
    path = sample_cli.run_sampling(workdir, overrides)  # the run's own config, read from its checkpoint
    assert os.path.basename(path) == "update4-maskgit8-cfg3-r4.5-seed3-n20.npz"
    with np.load(path) as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (20,)
    assert labels.min() >= 0 and labels.max() < 9
    assert os.path.isfile(path[: -len(".npz")] + ".png")
    assert len(np.unique(images.reshape(20, -1), axis=0)) == 20
    with pytest.raises(ConfigError, match="--sampler is a DiT/SiT option"):
        sample_cli.run_sampling(workdir, overrides | {"sampler": "ddpm"})

    # the reference batch: the crops the cache stored (the images the tokens came from)
    meta = latent_cache.read_meta(demo_tokens)
    source = grain.sources.ArrayRecordDataSource(latent_cache.complete_chunk_files(demo_tokens, meta))
    shape = latent_cache.image_shape(meta)
    ref = np.stack([latent_cache.decode_token_record(source[i], TOY_GRID, shape)["image"] for i in range(len(source))])
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    inception.save(inception.build(inception.tiny(), seed=4), tmp_path / "inception")
    code = eval_samples.main(["--samples", path, "--ref", str(tmp_path / "ref.npz"), "--inception",
                              str(tmp_path / "inception"), "--out", str(tmp_path / "eval.json"), "--batch_size", "16",
                              "--no_cache", "--quiet"])
    assert code == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert set(scores) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(np.isfinite(v) for v in scores.values()) and scores["fid"] > 0 and scores["inception_score"] >= 1


def test_same_samples_on_8_and_2_devices(trained):
    workdir, _ = trained
    c = parse_config(tiny_maskgit_config(""), check_cache=False)
    cfg = maskgit_job.model_config(c, HOST)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    host = ckpt.read_json(4, ("host",))["host"]
    target = mg_state.abstract_state(cfg, mg_state.make_optimizer(c.optim), make_mesh(-1, 1), c.fsdp_min_size, True)
    params = ckpt.restore(4, target).state.ema
    ckpt.close()
    model = mg_state.functional_model(cfg)
    decode = sampling.make_code_decoder(build_autoencoder(maskgit_job.cache_tokenizer(host)))
    mesh8, mesh2 = make_mesh(-1, 1), make_mesh(-1, 1, devices=jax.devices()[:2])
    gen8 = sampling.make_generate(model, decode, mesh8)
    gen2 = sampling.make_generate(model, decode, mesh2)
    a, la = generate_all(gen8, params, 7, 6, 8, mesh8)
    params2 = jax.device_put(params, NamedSharding(mesh2, PartitionSpec()))
    b, lb = generate_all(gen2, params2, 7, 6, 4, mesh2)  # other devices, batch 4: two calls
    c8, _ = generate_all(gen8, params, 8, 6, 8, mesh8)
    assert a.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a, b)
    assert (a != c8).mean() > 0.1  # another seed: other samples
