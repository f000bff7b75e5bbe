"""SiT's linear interpolant with velocity prediction (willisma/SiT `transport/`, path 'Linear', 'velocity').

Convention (SiT's `ICPlan`): x0 is Gaussian noise, x1 is data and t runs from 0 (noise) to 1 (data):
    x_t = t * x1 + (1 - t) * x0,    target velocity u_t = x1 - x0,
so alpha_t = t, sigma_t = 1 - t. Training draws t ~ U(0, 1): `create_transport` forces train_eps =
sample_eps = 0 for the velocity / linear combination. The loss is mean((v(x_t, t) - u_t)^2) per example.
With learned-sigma weights (8 output channels) only the first C channels are the velocity, as in SiT.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from eqvae_jax.diffusion.likelihood import mean_flat

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DIFFUSION_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing", "increasing-decreasing")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(t: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, u_t) on the linear path: x_t = t x1 + (1 - t) x0, u_t = x1 - x0."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def velocity(model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """The model's velocity: its first C output channels (SiT drops the learned-sigma half)."""
    return model_fn(x, t)[..., : x.shape[-1]]


def training_loss(model_fn: ModelFn, x1: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """Per-example velocity-matching loss for data x1, noise x0 and times t (`Transport.training_losses`)."""
    xt, ut = interpolate(t, x0, x1)
    return mean_flat(jnp.square(velocity(model_fn, xt, t) - ut))


def sample_time(key: jax.Array, batch: int, t0: float = 0.0, t1: float = 1.0) -> jax.Array:
    """Training times t ~ U(t0, t1) (SiT: t0 = train_eps = 0 and t1 = 1 for velocity / linear)."""
    return jax.random.uniform(key, (batch,)) * (t1 - t0) + t0


def score_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """grad log p_t(x) = (t v - x) / (1 - t) on the linear path (`ICPlan.get_score_from_velocity`)."""
    tb = _bcast(t, x)
    return (tb * v - x) / (1 - tb)


def diffusion_coefficient(t: jax.Array, x: jax.Array, form: str = "sigma", norm: float = 1.0) -> jax.Array:
    """SiT's SDE diffusion coefficient w(t) (`ICPlan.compute_diffusion`); the SDE noise scale is sqrt(2 w).

    'sigma' (SiT's sampling CLI default): norm (1 - t); 'SBDM' (score-based diffusion): norm (1 - t) / t,
    infinite at t = 0 (use with sample_eps > 0); 'constant': norm; 'linear': norm (1 - t);
    'decreasing': (norm cos(pi t) + 1)^2 / 4; 'increasing-decreasing': norm sin(pi t)^2.
    """
    tb = _bcast(t, x)
    if form == "sigma" or form == "linear":
        w = norm * (1 - tb)
    elif form == "SBDM":
        w = norm * ((1 - tb) ** 2 / tb + (1 - tb))
    elif form == "constant":
        w = jnp.full_like(tb, norm)
    elif form == "decreasing":
        w = 0.25 * (norm * jnp.cos(jnp.pi * tb) + 1) ** 2
    elif form == "increasing-decreasing":
        w = norm * jnp.sin(jnp.pi * tb) ** 2
    else:
        raise ValueError(f"diffusion form must be one of {DIFFUSION_FORMS}, got {form!r}")
    return w


def sde_drift(
    model_fn: ModelFn, x: jax.Array, t: jax.Array, form: str = "sigma", norm: float = 1.0
) -> jax.Array:
    """Drift of the reverse-time SDE with the same marginals: v + w(t) * score."""
    v = velocity(model_fn, x, t)
    return v + diffusion_coefficient(t, x, form, norm) * score_from_velocity(v, x, t)
