"""SiT interpolant, ODE/SDE sampler steps against numpy, and classifier-free guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqvae_jax.diffusion.flow_sampling import (
    euler_maruyama_step,
    euler_step,
    heun_step,
    ode_sample,
    sde_sample,
)
from eqvae_jax.diffusion.guidance import cfg_model_fn, conditional_model_fn, guide
from eqvae_jax.diffusion.interpolant import (
    diffusion_coefficient,
    interpolate,
    sample_time,
    score_from_velocity,
    training_loss,
)
from eqvae_jax.models.dit import DiTConfig, build

RNG = np.random.default_rng(0)
SHAPE = (3, 4, 4, 2)


def fake_velocity(x, t):
    """Nonlinear stand-in for a SiT with learned sigma (2C outputs; only the first C are the velocity)."""
    tt = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
    return jnp.concatenate([jnp.sin(x) * (1 + tt) - 0.5 * x, 100 + x], axis=-1)


def np_v(x, t):
    tt = np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    return np.sin(x) * (1 + tt) - 0.5 * x


def np_score(v, x, t):
    """SiT ICPlan, alpha = t, sigma = 1 - t:
    score = (alpha/d_alpha v - x) / (sigma^2 - alpha/d_alpha d_sigma sigma)."""
    a, da, s, ds = t, 1.0, 1 - t, -1.0
    return ((a / da) * v - x) / (s**2 - (a / da) * ds * s)


def f32(a):
    return jnp.asarray(a, jnp.float32)


def test_linear_interpolant_and_loss():
    x0, x1 = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
    t = np.array([0.0, 0.3, 1.0])
    xt, ut = interpolate(f32(t), f32(x0), f32(x1))
    tb = t.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(xt, tb * x1 + (1 - tb) * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xt)[0], x0[0], rtol=1e-6)  # t = 0 is noise
    np.testing.assert_allclose(np.asarray(xt)[2], x1[2], rtol=1e-6)  # t = 1 is data
    np.testing.assert_allclose(ut, x1 - x0, rtol=1e-5, atol=1e-6)
    loss = training_loss(fake_velocity, f32(x1), f32(t), f32(x0))
    want = ((np_v(tb * x1 + (1 - tb) * x0, t) - (x1 - x0)) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    ts = sample_time(jax.random.key(0), 10000)
    assert float(ts.min()) >= 0 and float(ts.max()) < 1 and abs(float(ts.mean()) - 0.5) < 0.02


def test_score_and_diffusion_coefficients():
    x, v = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
    t = np.array([0.1, 0.5, 0.9])
    tb = t.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(score_from_velocity(f32(v), f32(x), f32(t)), np_score(v, x, tb), rtol=1e-5)
    sbdm = (1 / tb) * (1 - tb) ** 2 - (1 - tb) * -1.0  # alpha_ratio sigma^2 - sigma d_sigma
    want = {
        "sigma": 1 - tb,
        "SBDM": sbdm,
        "constant": np.ones_like(tb),
        "linear": 1 - tb,
        "decreasing": 0.25 * (np.cos(np.pi * tb) + 1) ** 2,
        "increasing-decreasing": np.sin(np.pi * tb) ** 2,
    }
    for form, w in want.items():
        got = diffusion_coefficient(f32(t), f32(x), form, 1.0)
        np.testing.assert_allclose(np.broadcast_to(got, x.shape), np.broadcast_to(w, x.shape), rtol=1e-5)
    with pytest.raises(ValueError):
        diffusion_coefficient(f32(t), f32(x), "cosine")


def test_euler_heun_and_em_steps():
    x = RNG.normal(size=SHAPE)
    t, dt = 0.3, 0.05
    tv = np.full(3, t)
    np.testing.assert_allclose(euler_step(fake_velocity, f32(x), t, dt), x + dt * np_v(x, tv), rtol=1e-5)
    k1 = np_v(x, tv)
    k2 = np_v(x + dt * k1, tv + dt)
    np.testing.assert_allclose(heun_step(fake_velocity, f32(x), t, dt), x + 0.5 * dt * (k1 + k2), rtol=1e-5)
    w = RNG.normal(size=SHAPE)
    for form, coef in (("sigma", 1 - t), ("SBDM", (1 - t) / t)):
        v = np_v(x, tv)
        drift = v + coef * np_score(v, x, t)
        want = x + drift * dt + np.sqrt(2 * coef) * np.sqrt(dt) * w
        got = euler_maruyama_step(fake_velocity, f32(x), t, dt, f32(w), form)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ode_sample_matches_hand_loop():
    x0 = RNG.normal(size=SHAPE)
    for method in ("euler", "heun"):
        got = jax.jit(lambda x, m=method: ode_sample(fake_velocity, x, num_steps=6, method=m))(f32(x0))
        x, ts = x0.copy(), np.linspace(0, 1, 6)
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            k1 = np_v(x, np.full(3, a))
            if method == "euler":
                x = x + (b - a) * k1
            else:
                x = x + 0.5 * (b - a) * (k1 + np_v(x + (b - a) * k1, np.full(3, b)))
        np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)


def test_sde_sample_last_step_and_determinism():
    x0 = f32(RNG.normal(size=SHAPE))
    key = jax.random.key(3)
    # two grid points on [0, 0.96]: one Euler-Maruyama step at t = 0, then the noise-free 'Mean' step
    got = sde_sample(fake_velocity, x0, key, num_steps=2)
    w = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), SHAPE))
    x, t = np.asarray(x0, np.float64), 0.0
    v = np_v(x, np.full(3, t))
    x = x + (v + (1 - t) * np_score(v, x, t)) * 0.96 + np.sqrt(2 * (1 - t)) * np.sqrt(0.96) * w
    v = np_v(x, np.full(3, 0.96))
    x = x + (v + 0.04 * np_score(v, x, 0.96)) * 0.04
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    run = jax.jit(lambda k: sde_sample(fake_velocity, x0, k, num_steps=20))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    with pytest.raises(ValueError, match="sample_eps"):
        sde_sample(fake_velocity, x0, key, form="SBDM")
    assert np.isfinite(np.asarray(sde_sample(fake_velocity, x0, key, 10, form="SBDM", sample_eps=1e-3))).all()


def test_cfg():
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    model = build(cfg, seed=1)
    # give the zero-initialised layers values so the class actually matters
    state = nnx_randomize(model)
    x = f32(RNG.normal(size=(2, 8, 8, 4)))
    t, y = jnp.array([10.0, 700.0]), jnp.array([3, 7])
    apply = jax.jit(lambda a, b, c: state(a, b, c))
    plain = conditional_model_fn(apply, y)(x, t)
    guided1 = cfg_model_fn(apply, y, 10, 1.0, in_channels=4)(x, t)
    np.testing.assert_allclose(guided1, plain, atol=1e-5)
    uncond = apply(x, t, jnp.full_like(y, 10))
    assert np.abs(np.asarray(plain - uncond)).max() > 1e-3
    g = cfg_model_fn(apply, y, 10, 4.0, in_channels=4, guide_channels=3)(x, t)
    np.testing.assert_allclose(
        g[..., :3], uncond[..., :3] + 4.0 * (plain[..., :3] - uncond[..., :3]), atol=1e-4
    )
    np.testing.assert_allclose(g[..., 3:], plain[..., 3:], atol=1e-5)
    np.testing.assert_array_equal(guide(plain, uncond, 2.0, 0), plain)


def nnx_randomize(model):
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32) for p in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)
