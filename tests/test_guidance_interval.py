"""REPA's guidance interval (sihyun-yu/REPA samplers.py): classifier-free guidance only at the sampler steps that
start at a noise level tau = 1 - t inside [low, high] (REPA's time, 1 = noise), driven through the production
flow-sampler steps and samplers with a cheap class-dependent stand-in for the SiT."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqvae_jax.diffusion import flow_sampling, sampling
from eqvae_jax.diffusion.guidance import cfg_model_fn, conditional_model_fn, in_interval, interval_cfg_model_fn
from eqvae_jax.models.dit import DiTConfig
from eqvae_jax.train.dit.config import guidance_problems

NULL, SCALE, C = 10, 4.0, 2
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, C)), jnp.float32)
Y = jnp.asarray([3, 7])
W = jnp.asarray(np.random.default_rng(1).standard_normal(X.shape), jnp.float32)


def apply(x, t, y):
    """A class- and time-dependent velocity with a learned-sigma half (2C channels), like a SiT's output."""
    tt = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
    yy = jnp.asarray(y, jnp.float32).reshape(-1, 1, 1, 1)
    return jnp.concatenate([jnp.sin(x + 0.3 * yy) * (1 + tt) - 0.5 * x, 100 + x], axis=-1)


def fns(interval):
    return (interval_cfg_model_fn(apply, Y, NULL, SCALE, C, interval), cfg_model_fn(apply, Y, NULL, SCALE, C),
            conditional_model_fn(apply, Y))


STEPS = {"euler": flow_sampling.euler_step, "heun": flow_sampling.heun_step,
         "euler_maruyama": lambda fn, x, t, dt: flow_sampling.euler_maruyama_step(fn, x, t, dt, W)}


def close(a, b, tol: float = 1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# Whole trajectories: the interval's model runs inside `lax.cond`, a computation XLA compiles apart from the
# unconditional one; with the suite's loop emitters (tests/cpu_devices.py) their `sin` can round an ulp apart, and
# up to 8 guided evaluations at scale 4 grow that to ~1e-5 (measured: 7e-6 for the SDE, 1e-6 for the ODE; exactly
# 0 when compiled as production does, EQVAE_TEST_XLA_OPTIMIZE=1). Far below the 1e-3 that tells the arms apart.
TRAJECTORY_TOL = 3e-5


def test_membership_is_repa_time_closed_at_both_ends():
    t = jnp.asarray([0.0, 0.25, 0.5, 0.75, 0.9, 1.0])  # tau = 1, 0.75, 0.5, 0.25, 0.1, 0
    assert in_interval(t, (0.0, 0.75)).tolist() == [False, True, True, True, True, True]
    assert in_interval(t, (0.25, 0.5)).tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        interval_cfg_model_fn(apply, Y, NULL, SCALE, C, (0.7, 0.2))


@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_step_outside_is_conditional_and_inside_is_cfg(name):
    step = STEPS[name]
    interval_fn, cfg, cond = fns((0.0, 0.7))
    t_out, t_in, dt = jnp.float32(0.1), jnp.float32(0.6), jnp.float32(0.05)  # tau 0.9 and 0.4
    close(step(interval_fn, X, t_out, dt), step(cond, X, t_out, dt))
    close(step(interval_fn, X, t_in, dt), step(cfg, X, t_in, dt))
    assert float(jnp.abs(step(cfg, X, t_in, dt) - step(cond, X, t_in, dt)).max()) > 1e-3  # guidance acts
    # the step is jittable with a traced start time (the samplers scan over it)
    close(jax.jit(lambda t: step(interval_fn, X, t, dt))(t_in), step(cfg, X, t_in, dt))


def test_heun_decides_once_per_step_from_its_start():
    """A Heun step from tau 0.72 (outside [0, 0.7]) to 0.68 (inside) is unguided in both evaluations, as REPA's
    euler_sampler(heun=True) checks t_cur for the correction too; deciding per evaluation would guide k2."""
    interval_fn, _, cond = fns((0.0, 0.7))
    t, dt = jnp.float32(0.28), jnp.float32(0.04)
    close(flow_sampling.heun_step(interval_fn, X, t, dt), flow_sampling.heun_step(cond, X, t, dt))
    per_evaluation = flow_sampling.heun_step(lambda x, tt: interval_fn(x, tt), X, t, dt)
    assert float(jnp.abs(per_evaluation - flow_sampling.heun_step(cond, X, t, dt)).max()) > 1e-3


def test_full_interval_is_cfg_and_an_empty_one_the_conditional_model():
    """Whole trajectories: [0, 1] guides every step; [0, 0] none (no step starts at tau = 0)."""
    key = jax.random.key(3)
    runs = {"ode": lambda fn: flow_sampling.ode_sample(fn, X, 5, "heun"),
            "sde": lambda fn: flow_sampling.sde_sample(fn, X, key, 5)}
    for name, run in runs.items():
        full, cfg, cond = fns((0.0, 1.0))
        close(run(full), run(cfg), TRAJECTORY_TOL)
        close(run(fns((0.0, 0.0))[0]), run(cond), TRAJECTORY_TOL)
        partial = run(fns((0.0, 0.7))[0])  # guides the later steps only: neither of the two
        assert min(float(jnp.abs(partial - run(cfg)).max()), float(jnp.abs(partial - run(cond)).max())) > 1e-3, name


def test_make_sampler_and_config_checks():
    """The job's sampler takes the interval for the SiT samplers and refuses it for DiT's."""
    cfg = DiTConfig(input_size=4, in_channels=C, num_classes=NULL, depth=1, hidden_size=8, num_heads=1)
    model = types.SimpleNamespace(config=cfg, apply=lambda params, x, t, y: apply(x, t, y))
    labels, keys = jnp.asarray([1, 5]), jax.random.split(jax.random.key(0), 2)
    run = lambda **kw: np.asarray(sampling.make_sampler(model, "sde", 4, **kw)(None, labels, keys))
    close(run(cfg_scale=SCALE, guidance_interval=(0.0, 0.0)), run(cfg_scale=1.0))
    partial, full = run(cfg_scale=SCALE, guidance_interval=(0.0, 0.7)), run(cfg_scale=SCALE)
    assert np.abs(partial - full).max() > 1e-3 and np.abs(partial - run(cfg_scale=1.0)).max() > 1e-3
    with pytest.raises(ValueError, match="needs a flow sampler"):
        sampling.make_sampler(model, "ddim", 4, cfg_scale=SCALE, guidance_interval=(0.0, 0.7))
    assert guidance_problems("sde", (0.0, 0.7)) == [] and guidance_problems("ddpm", (0.0, 1.0)) == []
    assert "SiT sampler" in guidance_problems("ddpm", (0.0, 0.7))[0]
    assert "0 <= low <= high <= 1" in guidance_problems("ode", (0.5, 0.2))[0]
