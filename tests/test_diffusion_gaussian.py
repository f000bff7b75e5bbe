"""DiT Gaussian diffusion: schedule, respacing, loss terms and sampler steps against numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from eqvae_jax.diffusion.ddpm_sampling import ddim_sample, ddim_step, ddpm_sample, ddpm_step
from eqvae_jax.diffusion.gaussian import model_timesteps, p_mean_variance, training_losses, vb_terms_bpd
from eqvae_jax.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from eqvae_jax.diffusion.schedule import create_schedule, linear_betas, space_timesteps

RNG = np.random.default_rng(0)
SHAPE = (4, 4, 4, 2)  # N, H, W, C (NHWC)


def np_schedule(betas):
    """guided-diffusion's quantities, written out step by step in float64."""
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar = np.array(abar)
    prev = np.concatenate([[1.0], abar[:-1]])
    pvar = betas * (1 - prev) / (1 - abar)
    return dict(
        abar=abar,
        prev=prev,
        pvar=pvar,
        plogvar=np.log(np.concatenate([[pvar[1]], pvar[1:]])),
        c1=betas * np.sqrt(prev) / (1 - abar),
        c2=(1 - prev) * np.sqrt(1 - betas) / (1 - abar),
    )


def fake_model(x, t):
    """A deterministic nonlinear 'network' with learned-range output (eps, v) for tests."""
    tt = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
    return jnp.concatenate([jnp.tanh(x) * (1 + tt), jnp.clip(0.3 * x - tt, -1, 1)], axis=-1)


def np_fake_model(x, t):
    tt = np.asarray(t, np.float64).reshape(-1, 1, 1, 1) / 1000.0
    return np.concatenate([np.tanh(x) * (1 + tt), np.clip(0.3 * x - tt, -1, 1)], axis=-1)


def test_linear_schedule_quantities():
    s = create_schedule("")
    betas = np.linspace(0.0001, 0.02, 1000)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12)
    np.testing.assert_allclose(linear_betas(250), np.linspace(0.0004, 0.08, 250), rtol=1e-12)  # scale 1000/n
    ref = np_schedule(betas)
    np.testing.assert_allclose(s.alphas_cumprod, ref["abar"], rtol=1e-10)
    assert s.alphas_cumprod[-1] == pytest.approx(4.0358e-05, rel=1e-4)
    np.testing.assert_allclose(s.alphas_cumprod_prev, ref["prev"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_variance, ref["pvar"], rtol=1e-10)
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == np.log(ref["pvar"][1])
    np.testing.assert_allclose(s.posterior_log_variance_clipped, ref["plogvar"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1, ref["c1"], rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef2, ref["c2"], rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ref["abar"] - 1), rtol=1e-10)
    np.testing.assert_array_equal(s.timestep_map, np.arange(1000))


def test_space_timesteps():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    np.testing.assert_array_equal(steps, [round(k * 999 / 249) for k in range(250)])
    assert sorted(space_timesteps(300, "10,15,20"))[:3] == [0, 11, 22]
    assert len(space_timesteps(300, [10, 15, 20])) == 45
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_betas():
    base, s = create_schedule(""), create_schedule("250")
    kept = sorted(space_timesteps(1000, "250"))
    np.testing.assert_array_equal(s.timestep_map, kept)
    # respacing keeps the marginals: alphas_cumprod at the kept steps are unchanged
    np.testing.assert_allclose(s.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)
    abar = base.alphas_cumprod[kept]
    np.testing.assert_allclose(s.betas, 1 - abar / np.concatenate([[1.0], abar[:-1]]), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_variance, np_schedule(s.betas)["pvar"], rtol=1e-10)
    assert s.num_timesteps == 250
    np.testing.assert_array_equal(np.asarray(model_timesteps(s, jnp.array([0, 249]))), [0, 999])


def test_normal_kl():
    m1, m2 = RNG.normal(size=5), RNG.normal(size=5)
    lv1, lv2 = RNG.normal(size=5), RNG.normal(size=5)
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    want = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(np.asarray(normal_kl(m1, lv1, m2, lv2)), want, rtol=1e-5)
    assert float(normal_kl(jnp.array(0.3), jnp.array(0.2), jnp.array(0.3), jnp.array(0.2))) == 0.0


def test_discretized_gaussian_log_likelihood():
    x = np.array([-1.0, -0.5, 0.0, 0.2, 1.0])
    mean, log_scale = np.array([-0.9, -0.45, 0.1, 0.2, 0.95]), np.array([-2.0, -1.0, -3.0, -4.0, -1.5])
    got = np.asarray(discretized_gaussian_log_likelihood(x, mean, log_scale))
    # the tanh CDF approximation is within ~1e-3 of the exact normal CDF
    cdf = lambda v: norm.cdf((v - mean) / np.exp(log_scale))
    exact = np.log(
        np.where(
            x < -0.999,
            cdf(x + 1 / 255),
            np.where(x > 0.999, 1 - cdf(x - 1 / 255), cdf(x + 1 / 255) - cdf(x - 1 / 255)),
        )
    )
    np.testing.assert_allclose(got, exact, atol=2e-2)
    # the 256 bins of [-1, 1] tile the real line: probabilities sum to one for any mean and scale
    grid = -1 + 2 * np.arange(256) / 255
    for m, ls in [(0.1, -2.0), (-0.7, -4.5), (0.99, 0.5)]:
        p = np.exp(
            np.asarray(
                discretized_gaussian_log_likelihood(grid, np.full(256, m), np.full(256, ls)), np.float64
            )
        )
        assert p.sum() == pytest.approx(1.0, abs=1e-4)


def np_p_mean_variance(s, out, x, t):
    c = x.shape[-1]
    g = lambda a: np.asarray(a)[t].reshape(-1, 1, 1, 1)
    eps, v = out[..., :c], out[..., c:]
    frac = (v + 1) / 2
    logvar = frac * g(np.log(s.betas)) + (1 - frac) * g(s.posterior_log_variance_clipped)
    x0 = np.sqrt(1 / g(s.alphas_cumprod)) * x - np.sqrt(1 / g(s.alphas_cumprod) - 1) * eps
    mean = g(s.posterior_mean_coef1) * x0 + g(s.posterior_mean_coef2) * x
    return mean, logvar, x0, eps


def test_training_losses_terms():
    s = create_schedule("")
    x0 = RNG.uniform(-1, 1, SHAPE)
    x0[0, 0, 0, 0] = -1.0  # exercise the open edge bins of the decoder likelihood
    x0[0, 0, 0, 1] = 1.0
    noise = RNG.normal(size=SHAPE)
    t = np.array([0, 1, 500, 999])
    terms = training_losses(
        s, fake_model, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)
    )
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    out = np_fake_model(xt, t)
    mean, logvar, _, eps = np_p_mean_variance(s, out, xt, t)
    true_mean = (
        s.posterior_mean_coef1[t].reshape(-1, 1, 1, 1) * x0
        + s.posterior_mean_coef2[t].reshape(-1, 1, 1, 1) * xt
    )
    true_logvar = s.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1)
    kl = 0.5 * (
        -1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 / np.exp(logvar)
    )
    kl = kl.reshape(4, -1).mean(1) / math.log(2)
    sd = np.exp(0.5 * logvar)
    approx = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    hi, lo = approx((x0 - mean + 1 / 255) / sd), approx((x0 - mean - 1 / 255) / sd)
    log = lambda v: np.log(np.maximum(v, 1e-12))
    logp = np.where(x0 < -0.999, log(hi), np.where(x0 > 0.999, log(1 - lo), log(hi - lo)))
    nll = -logp.reshape(4, -1).mean(1) / math.log(2)
    vb = np.where(t == 0, nll, kl)
    mse = ((noise - eps) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(terms["vb"], vb, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(terms["loss"], mse + vb, rtol=2e-3)
    rescaled = training_losses(
        create_schedule("250"), fake_model, x0, jnp.asarray(t % 250), noise, rescale_vb=True
    )
    plain = training_losses(create_schedule("250"), fake_model, x0, jnp.asarray(t % 250), noise)
    np.testing.assert_allclose(rescaled["vb"], plain["vb"] * 0.25, rtol=1e-6)  # num_timesteps / 1000


def test_vb_term_does_not_train_the_mean():
    s = create_schedule("")
    x0, noise = (
        jnp.asarray(RNG.normal(size=SHAPE), jnp.float32),
        jnp.asarray(RNG.normal(size=SHAPE), jnp.float32),
    )
    t = jnp.array([3, 40, 500, 900])
    out0 = RNG.normal(size=SHAPE[:-1] + (4,)).astype(np.float32) * 0.3

    def term(name):
        return jax.grad(lambda o: training_losses(s, lambda x, tt: o, x0, t, noise)[name].sum())(out0)

    g_vb, g_mse = term("vb"), term("mse")
    assert not np.asarray(g_vb[..., :2]).any() and np.abs(g_vb[..., 2:]).max() > 0
    assert not np.asarray(g_mse[..., 2:]).any() and np.abs(g_mse[..., :2]).max() > 0
    # without the stop-gradient the VB term would move the mean: check that it depends on it at all
    dvb = jax.grad(lambda o: vb_terms_bpd(s, o, x0, x0 * 0.5, t).sum())(out0)
    assert np.abs(dvb[..., :2]).max() > 0


def test_ddpm_and_ddim_steps():
    s = create_schedule("250")
    x = RNG.normal(size=SHAPE)
    noise = RNG.normal(size=SHAPE)
    t = np.array([0, 1, 120, 249])
    out = np_fake_model(x, s.timestep_map[t])
    mean, logvar, x0, _ = np_p_mean_variance(s, out, x, t)
    nonzero = (t != 0).reshape(-1, 1, 1, 1)
    want = mean + nonzero * np.exp(0.5 * logvar) * noise
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got, px0 = ddpm_step(s, f32(out), f32(x), jnp.asarray(t), f32(noise))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(px0, x0, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(got)[0], np.asarray(p_mean_variance(s, f32(out), f32(x), t).mean)[0]
    )
    # DDIM, eta = 0: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps(x0)
    ab, abp = s.alphas_cumprod[t].reshape(-1, 1, 1, 1), s.alphas_cumprod_prev[t].reshape(-1, 1, 1, 1)
    eps = (x / np.sqrt(ab) - x0) / np.sqrt(1 / ab - 1)
    want = np.sqrt(abp) * x0 + np.sqrt(1 - abp) * eps
    got, _ = ddim_step(s, f32(out), f32(x), jnp.asarray(t), f32(noise), eta=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # eta = 1: sigma^2 = (1 - abar_prev)/(1 - abar) (1 - abar/abar_prev), the DDPM posterior variance
    sig = np.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
    want = np.sqrt(abp) * x0 + np.sqrt(1 - abp - sig**2) * eps + nonzero * sig * noise
    got, _ = ddim_step(s, f32(out), f32(x), jnp.asarray(t), f32(noise), eta=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sampling_is_deterministic_per_seed():
    s = create_schedule("10")
    x_T = jax.random.normal(jax.random.key(5), SHAPE)
    seen = []

    def model(x, t):
        seen.append(t)
        return fake_model(x, t)

    run = jax.jit(lambda k: ddpm_sample(s, model, x_T, k))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.isfinite(np.asarray(a)).all()
    d1 = ddim_sample(s, fake_model, x_T, jax.random.key(0))
    d2 = ddim_sample(s, fake_model, x_T, jax.random.key(7))
    np.testing.assert_array_equal(d1, d2)  # eta = 0 uses no noise
    # one DDIM loop == the steps applied by hand with the original timesteps 999 ... 0
    x = x_T
    for i in range(9, -1, -1):
        t = jnp.full((4,), i)
        x, _ = ddim_step(s, fake_model(x, jnp.asarray(s.timestep_map)[t]), x, t, jnp.zeros_like(x))
    np.testing.assert_allclose(d1, x, rtol=1e-5, atol=1e-5)
