"""DDPM ancestral and DDIM sampling for DiT (`p_sample(_loop)`, `ddim_sample(_loop)`), jittable.

Loops are `lax.scan` over the (respaced) step indices from T-1 down to 0; the noise of step i is drawn from
`fold_in(key, i)`, so a seed fixes the whole trajectory. DiT's evaluation uses `create_schedule("250")`,
`clip_denoised=False` and DDPM (the EQ-VAE README's `--ddpm True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eqvae_jax.diffusion.gaussian import (
    ModelFn,
    extract,
    model_timesteps,
    p_mean_variance,
    predict_eps_from_xstart,
)
from eqvae_jax.diffusion.schedule import Schedule


def ddpm_step(
    sched: Schedule,
    model_out: jax.Array,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    var_type: str = "learned_range",
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """x_{t-1} = mean + [t > 0] exp(log_var / 2) noise; returns (sample, pred_xstart)."""
    out = p_mean_variance(sched, model_out, x, t, var_type, clip_denoised)
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_xstart


def ddim_step(
    sched: Schedule,
    model_out: jax.Array,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    eta: float = 0.0,
    var_type: str = "learned_range",
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """DDIM (eq. 12) step with stochasticity `eta` (0 = deterministic); returns (sample, pred_xstart)."""
    out = p_mean_variance(sched, model_out, x, t, var_type, clip_denoised)
    eps = predict_eps_from_xstart(sched, x, t, out.pred_xstart)
    ab = extract(sched.alphas_cumprod, t, x.ndim)
    ab_prev = extract(sched.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    mean = out.pred_xstart * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma**2) * eps
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return mean + nonzero * sigma * noise, out.pred_xstart


def _loop(sched: Schedule, model_fn: ModelFn, x_T: jax.Array, key: jax.Array, step) -> jax.Array:
    def body(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        t = jnp.full((x.shape[0],), i, jnp.int32)
        out = model_fn(x, model_timesteps(sched, t))
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return step(out, x, t, noise), None

    steps = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(body, x_T, steps)
    return x


def ddpm_sample(
    sched: Schedule,
    model_fn: ModelFn,
    x_T: jax.Array,
    key: jax.Array,
    var_type: str = "learned_range",
    clip_denoised: bool = False,
) -> jax.Array:
    """Ancestral sampling from noise `x_T` over every step of `sched` (`p_sample_loop`)."""
    return _loop(
        sched,
        model_fn,
        x_T,
        key,
        lambda out, x, t, noise: ddpm_step(sched, out, x, t, noise, var_type, clip_denoised)[0],
    )


def ddim_sample(
    sched: Schedule,
    model_fn: ModelFn,
    x_T: jax.Array,
    key: jax.Array,
    eta: float = 0.0,
    var_type: str = "learned_range",
    clip_denoised: bool = False,
) -> jax.Array:
    """DDIM sampling from `x_T` over every step of `sched` (`ddim_sample_loop`); eta=0 ignores `key`."""
    return _loop(
        sched,
        model_fn,
        x_T,
        key,
        lambda out, x, t, noise: ddim_step(sched, out, x, t, noise, eta, var_type, clip_denoised)[0],
    )
