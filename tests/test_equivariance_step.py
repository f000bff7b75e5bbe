"""The job's jitted generator/discriminator steps (train/eqvae/steps.compile_steps) over sampled branches: bounded,
counted variants and no recompilation once every static plan has been seen; gradients reach the encoder through
the equivariance branch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import load_config
from toys import ToyLPIPS, ToyVAE, production_steps

from eqvae_jax.losses import equivariance as eq
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.models.discriminator import NLayerDiscriminator
from eqvae_jax.parallel.mesh import batch_sharding, make_mesh, place
from eqvae_jax.train import compile_variants
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eqvae import steps
from eqvae_jax.train.eqvae.config import parse_config

HW = (64, 64)


def test_no_recompilation_after_every_plan_was_seen():
    cfg = eq.TransformConfig(scale_numerators=(12, 20))
    plans = eq.all_plans(cfg, HW)
    assert len(plans) == 5  # 2 equivariance + 2 low-res + 1 plain
    spec, state, lpips_state, _, _ = production_steps(
        ToyVAE(0), ToyLPIPS(1), NLayerDiscriminator(ndf=4, n_layers=1, rngs=nnx.Rngs(2)), LossConfig(),
        return_pair=False,  # the reference's (and the default) redrawn D transform: D has its own forward
    )
    mesh = make_mesh(2, 1, devices=jax.devices()[:2])  # the batch of 2 split over 2 devices, as in the job
    compiled = steps.compile_steps(spec, state, lpips_state, mesh)
    state = place(state, compiled.state_sharding)
    logs: list[str] = []
    g_tracker = compile_variants.VariantTracker("g_step", expected=len(plans), logger=logs.append)
    d_tracker = compile_variants.VariantTracker("d_step", expected=len(plans), logger=logs.append)
    x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (2, *HW, 3)).astype(np.float32), batch_sharding(mesh))
    sampler = eq.TransformSampler(cfg, seed=0)

    def one_step(i: int) -> tuple[eq.BranchPlan, int]:  # one micro-step as the job runs it (train/eqvae/job.py)
        nonlocal state
        plan, rot_k = sampler.draw().plan(HW)
        key_g, key_d = jax.random.split(jax.random.key(i))
        state, g_metrics, pair = g_tracker(plan, compiled.generator, state, lpips_state, x, rot_k, key_g, plan)
        d_plan, d_rot = sampler.draw().plan(HW)
        state, d_metrics = d_tracker(d_plan, compiled.discriminator, state, x, d_rot, key_d, pair, d_plan)
        assert np.isfinite(float(g_metrics["g/total"])) and np.isfinite(float(d_metrics["d/disc_loss"]))
        assert float(g_metrics["g/nonfinite"]) == 0 and float(d_metrics["d/nonfinite"]) == 0
        return plan, int(rot_k)

    seen: set[tuple[eq.BranchPlan, int]] = set()
    i = 0
    while g_tracker.count < len(plans) or d_tracker.count < len(plans):
        seen.add(one_step(i))
        i += 1
        assert i < 200
    compiles = compile_variants.compile_events()
    for j in range(i, i + 40):
        seen.add(one_step(j))
    assert compile_variants.compile_events() == compiles  # nothing compiled after warm-up
    assert set(g_tracker.records) == set(d_tracker.records) == set(plans)  # one program per plan and step
    assert int(state.step) == i + 40
    assert {k for p, k in seen if p.branch is eq.Branch.EQUIVARIANCE} == {1, 2, 3}  # rotation is traced
    assert len(logs) == 10 and all("new compiled variant" in line for line in logs)
    assert all(r.backend_compile_s > 0 for r in g_tracker.records.values())
    print("\n".join(logs))


def test_gradients_reach_the_encoder_through_the_equivariance_branch():
    vae, lp = ToyVAE(0), ToyLPIPS(1)
    disc = NLayerDiscriminator(ndf=4, n_layers=1, rngs=nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, *HW, 3)), jnp.float32)
    plan, rot_k = eq.Draw(eq.Branch.EQUIVARIANCE, (16, 16), 32, 1).plan(HW)
    graphdef, params = nnx.split(vae)

    def rec_only(p):  # the transformed reconstruction alone: no KL path to the encoder
        m = nnx.merge(graphdef, p, copy=True)
        target, recon, _ = eq.reconstruct_transformed(m, x, plan, rot_k, jax.random.key(0))
        return jnp.sum(jnp.abs(target - recon))

    g = jax.grad(rec_only)(params)
    assert float(jnp.abs(g["encoder"]["kernel"][...]).max()) > 0
    dgraph, dstate = nnx.split(disc)

    def total(p):  # the full generator objective; D merged inside since its BatchStat is written
        m, d = nnx.merge(graphdef, p, copy=True), nnx.merge(dgraph, dstate, copy=True)
        return eq.transformed_generator_loss(m, lp, d, x, plan, rot_k, jax.random.key(0), 0, LossConfig())[0]

    total_grad = jax.grad(total)(params)
    assert float(jnp.abs(total_grad["encoder"]["kernel"][...]).max()) > 0


def test_equal_specs_share_their_jitted_steps_and_a_changed_one_does_not():
    """compile_steps keeps the jitted pair per (spec, mesh, shardings): a second run of the same job in one process
    (resume, the replication's control arm) reuses JAX's traces instead of tracing and lowering again."""
    config = load_config("sdvae_ft", "tiny")
    first, again = eqvae_job.build(parse_config(config)), eqvae_job.build(parse_config(config))
    assert first.spec == again.spec and hash(first.spec) == hash(again.spec)
    assert first.steps is again.steps
    other = load_config("sdvae_ft", "tiny", **{"optim.base_lr": 1e-5})
    changed = eqvae_job.build(parse_config(other))
    assert changed.spec != first.spec and changed.steps is not first.steps
