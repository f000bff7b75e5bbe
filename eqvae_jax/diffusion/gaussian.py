"""DiT's Gaussian diffusion: forward process, model mean/variance and the hybrid (MSE + VB) training loss.

Pure functions over a `Schedule`; images are NHWC and the model output carries epsilon in the first C channels
and, for `var_type="learned_range"` (DiT's default, learn_sigma=True), the variance interpolation values
v in [-1, 1] in the next C: log var = (v+1)/2 * log(beta_t) + (1-(v+1)/2) * log(posterior variance, clipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eqvae_jax.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from eqvae_jax.diffusion.schedule import Schedule

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


def var_type_for(learn_sigma: bool) -> str:
    """DiT's `create_diffusion`: learned-range variance for a model that predicts sigma, else fixed large."""
    return "learned_range" if learn_sigma else "fixed_large"
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class MeanVariance(NamedTuple):
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def extract(arr: np.ndarray | jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """arr[t] as float32, shaped to broadcast against a batch of rank `ndim`."""
    return jnp.asarray(arr, jnp.float32)[t].reshape((-1,) + (1,) * (ndim - 1))


def model_timesteps(sched: Schedule, t: jax.Array) -> jax.Array:
    """The timestep the network sees for step index t (differs from t after respacing)."""
    return jnp.asarray(sched.timestep_map, jnp.int32)[t]


def q_sample(sched: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    n = x_start.ndim
    return (
        extract(sched.sqrt_alphas_cumprod, t, n) * x_start
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, n) * noise
    )


def q_posterior_mean_variance(
    sched: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = (
        extract(sched.posterior_mean_coef1, t, n) * x_start + extract(sched.posterior_mean_coef2, t, n) * x_t
    )
    return mean, extract(sched.posterior_variance, t, n), extract(sched.posterior_log_variance_clipped, t, n)


def predict_xstart_from_eps(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    n = x_t.ndim
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, n) * x_t
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, n) * eps
    )


def predict_eps_from_xstart(sched: Schedule, x_t: jax.Array, t: jax.Array, xstart: jax.Array) -> jax.Array:
    n = x_t.ndim
    return (extract(sched.sqrt_recip_alphas_cumprod, t, n) * x_t - xstart) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, n
    )


def p_mean_variance(
    sched: Schedule,
    model_out: jax.Array,
    x: jax.Array,
    t: jax.Array,
    var_type: str = "learned_range",
    clip_denoised: bool = False,
) -> MeanVariance:
    """p(x_{t-1} | x_t) from an epsilon-prediction model output (`p_mean_variance`)."""
    c, n = x.shape[-1], x.ndim
    if var_type == "learned_range":
        if model_out.shape[-1] != 2 * c:
            raise ValueError(f"learned_range needs {2 * c} output channels, got {model_out.shape[-1]}")
        eps, var_values = model_out[..., :c], model_out[..., c:]
        min_log = extract(sched.posterior_log_variance_clipped, t, n)
        max_log = extract(sched.log_betas, t, n)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = jnp.exp(log_variance)
    elif var_type in ("fixed_large", "fixed_small"):
        eps = model_out[..., :c]
        if var_type == "fixed_large":
            var = np.append(sched.posterior_variance[1], sched.betas[1:])
            logvar = np.log(var)
        else:
            var, logvar = sched.posterior_variance, sched.posterior_log_variance_clipped
        variance = jnp.broadcast_to(extract(var, t, n), x.shape)
        log_variance = jnp.broadcast_to(extract(logvar, t, n), x.shape)
    else:
        raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
    pred_xstart = predict_xstart_from_eps(sched, x, t, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x, t)
    return MeanVariance(mean, variance, log_variance, pred_xstart)


def vb_terms_bpd(
    sched: Schedule,
    model_out: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    var_type: str = "learned_range",
) -> jax.Array:
    """Per-example VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the discretized
    Gaussian decoder NLL of x_0 at t = 0 (`_vb_terms_bpd`, clip_denoised=False)."""
    true_mean, _, true_logvar = q_posterior_mean_variance(sched, x_start, x_t, t)
    out = p_mean_variance(sched, model_out, x_t, t, var_type, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_logvar, out.mean, out.log_variance)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance))
    return jnp.where(t == 0, nll / math.log(2.0), kl)


def training_losses(
    sched: Schedule,
    model_fn: ModelFn,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    var_type: str = "learned_range",
    rescale_vb: bool = False,
) -> dict[str, jax.Array]:
    """DiT `training_losses`, loss_type MSE: per-example {'loss', 'mse', 'vb'} (vb = 0 for fixed variances).

    The VB term sees the epsilon prediction through stop_gradient, so it trains only the variance channels.
    `rescale_vb` is loss_type RESCALED_MSE: vb *= num_timesteps / 1000 (DiT's default is MSE: no factor).
    `model_fn(x_t, timesteps)` receives the original-process timesteps (`timestep_map[t]`).
    """
    x_t = q_sample(sched, x_start, t, noise)
    out = model_fn(x_t, model_timesteps(sched, t))
    c = x_start.shape[-1]
    eps = out[..., :c]
    if var_type == "learned_range":
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., c:]], axis=-1)
        vb = vb_terms_bpd(sched, frozen, x_start, x_t, t, var_type)
        if rescale_vb:
            vb = vb * (sched.num_timesteps / 1000.0)
    else:
        vb = jnp.zeros(x_start.shape[0], jnp.float32)
    mse = mean_flat(jnp.square(noise - eps))
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def sample_timesteps(key: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
    """Uniform training timesteps in [0, num_timesteps), as DiT's `torch.randint`."""
    return jax.random.randint(key, (batch,), 0, num_timesteps)
