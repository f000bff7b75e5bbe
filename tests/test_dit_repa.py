"""SiT + REPA in the DiT/SiT job (8 fake devices, FSDP): the job's loss equals a numpy transcription of REPA's
SILoss + train.py on the same model (time direction mirrored), the step's teacher path equals given features
and leaves the teacher untouched, a non-finite step is not applied, the loss (denoising and alignment) falls
on a toy cache with images, an interrupted and resumed run equals an uninterrupted one bit for bit (and samples
from its workdir), the projector is sharded by the rule table, the configs are REPA's recipe, and bad configs
are rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import repa_reference as ref_repa
from absl import flags
from helpers import TOY_SHAPE, jax_cache, load_config, tiny_repa_config, toy_images, toy_patterns, write_toy_cache
from jax.sharding import PartitionSpec

from eqvae_jax import sample as sample_cli
from eqvae_jax.diffusion import interpolant
from eqvae_jax.models import dinov2
from eqvae_jax.parallel.mesh import batch_sharding, make_mesh
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import parse_config
from eqvae_jax.train.dit.steps import latent_factors, make_loss_fn, make_train_step, sit_repa_loss, teacher_targets
from eqvae_jax.typed_config import ConfigError

flags.FLAGS.mark_as_parsed()
B = 8


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("toy_images") / "cache")
    write_toy_cache(path, images=True)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return jax_cache()


def _setup(config):
    c = parse_config(config)
    mesh = make_mesh(1, -1)
    tx = dit_state.make_optimizer(c.optim)
    model, state, shardings = dit_state.create(c.dit_config(TOY_SHAPE), c.seed, tx, mesh, c.fsdp_min_size)
    teacher, teacher_shardings = dit_state.create_teacher(c.repa, c.teacher_config(), mesh, c.fsdp_min_size, c.seed)
    return c, mesh, tx, model, state, shardings, teacher, teacher_shardings


def _perturbed(params, scale=0.05):
    """Params with noise on every leaf (the zero-initialised output layers would make the loss trivial)."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    rng = np.random.default_rng(7)
    return jax.tree.unflatten(tree, [x + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _batch(mean=None):
    z = np.tile(toy_patterns(), (2, 1, 1, 1))
    return {"mean": jnp.asarray(z if mean is None else mean), "std": jnp.full((B, *TOY_SHAPE), 0.05),
            "label": jnp.tile(jnp.arange(4, dtype=jnp.int32), 2), "image": jnp.asarray(toy_images(B))}


def test_loss_equals_repa_siloss_transcription(toy_cache):
    c, _, _, model, state, _, _, _ = _setup(tiny_repa_config(toy_cache))
    params = _perturbed(state.params)
    rng = np.random.default_rng(0)
    z = np.tile(toy_patterns(), (2, 1, 1, 1))
    y = np.tile(np.arange(4, dtype=np.int32), 2)
    t = (rng.integers(1, 1024, B) / 1024).astype(np.float32)  # k / 1024: 1 - (1 - t) == t exactly
    noise = rng.standard_normal(z.shape).astype(np.float32)
    depth, coeff = c.repa.encoder_depth, c.repa.proj_coeff
    aligned = jax.jit(lambda x, s: model.apply_aligned(params, x, s, y, depth))
    # targets near the model's own projection (cosines ~0.9), so the alignment term is far from zero
    z_tilde = np.asarray(aligned(t[:, None, None, None] * z + (1 - t[:, None, None, None]) * noise, t)[1])
    targets = z_tilde + 0.3 * z_tilde.std() * rng.standard_normal(z_tilde.shape).astype(np.float32)

    loss = jax.jit(lambda p, z, y, t, n, f: sit_repa_loss(model, p, z, y, t, n, f, depth, coeff))
    total, terms = loss(params, z, y, t, noise, targets)


    def repa_model(x, t_repa):  # REPA's SiT in its convention: t = 0 data, velocity noise - data
        out, z_tilde = aligned(x, 1 - t_repa)
        return -np.asarray(out)[..., : z.shape[-1]], [np.asarray(z_tilde)]

    denoising, proj = ref_repa.si_loss(repa_model, z, 1 - t, noise, [targets])
    want = ref_repa.train_loss(denoising, proj, coeff)
    print(f"SiT + REPA loss {float(total):.7f} (denoising {float(terms['denoising']):.7f}, proj "
          f"{float(terms['proj_loss']):.7f}) vs REPA SILoss + train.py transcription {want:.7f} "
          f"({denoising.mean():.7f}, {proj:.7f})")
    assert abs(float(terms["proj_loss"]) - proj) <= 1e-6 and abs(float(terms["denoising"]) - denoising.mean()) <= 1e-5
    assert abs(float(total) - want) <= 1e-5 and proj < -0.5  # the projection term is really there
    # the tap leaves the denoising output alone: plain SiT's loss on the same draws
    plain = jax.jit(lambda: interpolant.training_loss(lambda x, s: model.apply(params, x, s, jnp.asarray(y)),
                                                      jnp.asarray(z), jnp.asarray(t), jnp.asarray(noise)))()
    np.testing.assert_allclose(float(jnp.mean(plain)), float(terms["denoising"]), rtol=1e-6)
    # the job's loss function draws t and noise from its key, then composes exactly this
    key = jax.random.key(3)
    loss_fn = make_loss_fn(model, "sit", repa_config=c.repa)
    got, _ = jax.jit(lambda p: loss_fn(p, jnp.asarray(z), jnp.asarray(y), key, False, jnp.asarray(targets)))(params)
    k_t, k_noise, _ = jax.random.split(key, 3)
    again, _ = loss(params, z, y, interpolant.sample_time(k_t, B), jax.random.normal(k_noise, z.shape), targets)
    np.testing.assert_allclose(float(got), float(again), rtol=1e-6)  # the same sum, compiled in another program
    with pytest.raises(ValueError, match="targets"):
        loss_fn(params, jnp.asarray(z), jnp.asarray(y), key, False)


def test_step_teacher_path_features_path_and_nonfinite_guard(toy_cache):
    c, mesh, tx, model, _, shardings, teacher, teacher_shardings = _setup(tiny_repa_config(toy_cache))
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(teacher_shardings.state))  # replicated by default
    teacher_before = jax.device_get(teacher.state)
    with_teacher = make_train_step(model, tx, c, mesh, shardings, teacher_shardings)
    with_features = make_train_step(model, tx, c, mesh, shardings)
    factors = latent_factors(1.0, 0.0)
    batch, key = _batch(), jax.random.key(0)
    features = jax.jit(lambda t, x: teacher_targets(t, x, model), out_shardings=batch_sharding(mesh))(
        teacher, batch["image"])
    assert features.shape == (B, 16, c.repa.z_dim)  # 56 px teacher input: a 4x4 grid, the SiT's token grid

    fresh = lambda: dit_state.create(c.dit_config(TOY_SHAPE), c.seed, tx, mesh, c.fsdp_min_size)[1]
    a, ma = with_teacher(fresh(), batch, key, factors, teacher)
    b, mb = with_features(fresh(), {k: v for k, v in batch.items() if k != "image"} | {"teacher_features": features},
                          key, factors)
    for x, y_ in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_allclose(x, y_, rtol=1e-5, atol=1e-6)  # two programs: rounding differs (lr 3e-3)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6) and float(ma["nonfinite"]) == 0.0
    np.testing.assert_allclose(float(ma["loss"]), float(ma["denoising"]) + 0.5 * float(ma["proj_loss"]), rtol=1e-6)
    before = jax.device_get(a)
    assert np.abs(before.params["projector"]["linear_0"]["kernel"]
                  - jax.device_get(fresh().params["projector"]["linear_0"]["kernel"])).max() > 0  # trained
    for x, y_ in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(teacher.state)), strict=True):
        np.testing.assert_array_equal(x, y_)  # never updated

    bad = _batch(mean=np.full((B, *TOY_SHAPE), np.nan, np.float32))
    new, m = with_teacher(a, bad, key, factors, teacher)
    after = jax.device_get(new)
    assert float(m["nonfinite"]) == 1.0 and int(after.step) == 2
    for x, y_ in zip(jax.tree.leaves((before.params, before.ema, before.opt_state)),
                     jax.tree.leaves((after.params, after.ema, after.opt_state)), strict=True):
        np.testing.assert_array_equal(x, y_)


def _eval(config, params, teacher) -> tuple[float, float]:
    """(denoising, projection) loss on the toy set at 8 fixed draws, no label dropout."""
    c, _, _, model, _, _, _, _ = _setup(config)
    loss_fn = jax.jit(make_loss_fn(model, "sit", repa_config=c.repa), static_argnums=(4,))
    batch = _batch()
    targets = jax.jit(lambda t, x: teacher_targets(t, x, model))(teacher, batch["image"])
    terms = [loss_fn(params, batch["mean"], batch["label"], jax.random.key(k), False, targets)[1] for k in range(8)]
    return tuple(float(np.mean([t[name] for t in terms])) for name in ("denoising", "proj_loss"))


@pytest.mark.slow
def test_loss_falls_with_repa(toy_cache, compile_cache, tmp_path):
    config = tiny_repa_config(toy_cache, compile_cache, total_updates=30,
                              **{"log.every_updates": 15, "checkpoint.every_updates": 30})
    _, _, _, _, initial, _, teacher, _ = _setup(config)
    before = _eval(config, initial.params, teacher)
    final = dit_job.run(config, str(tmp_path / "run"))["state"]
    after = _eval(config, final.params, teacher)
    print(f"toy SiT + REPA, 30 updates: denoising {before[0]:.4f} -> {after[0]:.4f}, "
          f"projection {before[1]:.4f} -> {after[1]:.4f}")
    assert after[0] < 0.95 * before[0] and after[1] < before[1] - 0.1, (before, after)


@pytest.mark.slow
def test_repa_run_resumes_exactly(toy_cache, compile_cache, tmp_path):
    config = tiny_repa_config(toy_cache, compile_cache, total_updates=4)
    straight = dit_job.run(config, str(tmp_path / "straight"))["state"]
    stopped = dit_job.run(config, str(tmp_path / "resumed"), stop_after=2)
    assert stopped["stopped"] == 2
    resumed = dit_job.run(config, str(tmp_path / "resumed"))
    assert resumed["start_update"] == 2 and int(resumed["state"].step) == 4
    flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(straight))
    flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(resumed["state"]))
    assert len(flat_a) == len(flat_b) and any("projector" in jax.tree_util.keystr(p) for p, _ in flat_a)
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    kernel = lambda s: np.asarray(s.params["projector"]["linear_4"]["kernel"])
    assert not np.array_equal(kernel(stopped["state"]), kernel(straight))  # updates 3-4 changed the projector

    changed = tiny_repa_config(toy_cache, compile_cache, total_updates=6, **{"repa.proj_coeff": 1.0})
    with pytest.raises(ValueError, match="resuming with a different config.*repa.proj_coeff"):
        dit_job.run(changed, str(tmp_path / "resumed"))
    # the sampling CLI restores the run (projector included) from its own config, without the teacher
    path = sample_cli.run_sampling(str(tmp_path / "straight"), {"num_samples": 2, "num_steps": 2, "batch_size": 8})
    with np.load(path) as f:
        assert f["arr_0"].shape == (2, 64, 64, 3)


def test_recipe_configs_and_shardings():
    c = parse_config(load_config("dit", "model=XL/2,objective=sit,repa"), check_cache=False)
    r = c.repa
    assert (c.objective, r.enabled, r.encoder_depth, r.proj_coeff, r.z_dim, r.projector_dim, r.teacher_dtype) == \
        ("sit", True, 8, 0.5, 768, 2048, "bfloat16")
    assert (c.model.learn_sigma, c.optim.grad_clip, c.optim.lr, c.optim.weight_decay, c.optim.eps, c.global_batch_size,
            c.ema_decay, c.total_updates, c.model.class_dropout_prob) == (False, 1.0, 1e-4, 0.0, 1e-8, 256, 0.9999,
                                                                          400_000, 0.1)
    cfg = c.dit_config((32, 32, 4))
    assert (cfg.z_dim, cfg.projector_dim, cfg.out_channels, cfg.depth) == (768, 2048, 4, 28)
    mesh = make_mesh(1, -1)
    abstract = dit_state.abstract_state(cfg, 0, dit_state.make_optimizer(c.optim), mesh, c.fsdp_min_size)
    proj = abstract.params["projector"]
    assert proj["linear_2"]["kernel"].shape == (2048, 2048)
    assert "fsdp" in tuple(proj["linear_0"]["kernel"].sharding.spec)
    assert "fsdp" in tuple(abstract.ema["projector"]["linear_4"]["kernel"].sharding.spec)
    teacher = dit_state.abstract_teacher(dinov2.preset("vitb14"), mesh, "fsdp", c.fsdp_min_size)
    qkv = teacher.state["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (12, 768, 2304) and qkv.sharding.spec[0] is None and "fsdp" in tuple(qkv.sharding.spec)
    replicated = dit_state.abstract_teacher(dinov2.preset("vitb14"), mesh, "replicated", c.fsdp_min_size)
    assert all(x.sharding.spec == PartitionSpec() for x in jax.tree.leaves(replicated.state))


def test_config_validation(toy_cache, tmp_path):
    write_toy_cache(str(tmp_path / "no_images"))
    with pytest.raises(ConfigError, match="stores no images.*store_images=True"):
        parse_config(tiny_repa_config(str(tmp_path / "no_images")))
    config = tiny_repa_config(toy_cache, **{"repa.encoder_depth": 3, "repa.z_dim": 48})
    config.objective = "ddpm"
    config.sample.sampler = "ddpm"
    with pytest.raises(ConfigError, match=r"(?s)needs objective='sit'.*encoder_depth=3 must be in \[1, 2\].*"
                                          r"z_dim=48 differs from the teacher's feature size 32"):
        parse_config(config)
    with pytest.raises(ConfigError, match=r"(?s)teacher_sharding must be.*teacher_dtype must be one of"):
        parse_config(tiny_repa_config(toy_cache, **{"repa.teacher_dtype": "fp8", "repa.teacher_sharding": "tp"}))
    with pytest.raises(ConfigError, match="repa.teacher is empty"):
        parse_config(tiny_repa_config(toy_cache, **{"repa.teacher": ""}))
    with pytest.raises(ConfigError, match="repa.teacher_preset 'vitz14'"):
        parse_config(tiny_repa_config(toy_cache, **{"repa.teacher_preset": "vitz14"}))
    assert parse_config(tiny_repa_config(toy_cache, **{"repa.teacher": str(tmp_path)}), check_cache=False).repa.enabled
