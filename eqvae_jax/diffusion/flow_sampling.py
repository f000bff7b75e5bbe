"""SiT samplers on the linear interpolant: fixed-step ODE (Euler, Heun) and SDE (Euler-Maruyama), jittable.

Step counts follow SiT: `num_steps` is the number of time-grid points linspace(t0, t1, num_steps).
- ODE: num_steps - 1 steps of dx/dt = v(x, t) from t0 = 0 (noise) to t1 = 1 (data). SiT's default solver is
  adaptive dopri5 (torchdiffeq); only the fixed-grid 'euler' and 'heun2' methods are provided here.
- SDE (`Sampler.sample_sde`, SiT CLI defaults: Euler-Maruyama, diffusion form 'sigma', norm 1, last step
  'Mean' of size 0.04, 250 steps): the grid runs to t1 = 1 - last_step_size; num_steps - 1 steps of
      x <- x + drift(x, t) dt + sqrt(2 w(t)) sqrt(dt) N(0, I)
  then the last step without noise: 'Mean' x + drift(x, t1) * size, 'Euler' x + v(x, t1) * size,
  'Tweedie' x / t1 + (1 - t1)^2 / t1 * score, or None (return x). t0 = sample_eps for 'SBDM', else 0.
Noise of step i comes from fold_in(key, i).
A model_fn with a guidance interval (`guidance.IntervalGuidance`, REPA's samplers) is asked once per step, from
the step's start time, whether to guide; every evaluation of that step (Heun's second one included) follows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eqvae_jax.diffusion.guidance import for_step
from eqvae_jax.diffusion.interpolant import (
    ModelFn,
    diffusion_coefficient,
    score_from_velocity,
    sde_drift,
    velocity,
)

LAST_STEPS = (None, "Mean", "Euler", "Tweedie")


def _tvec(x: jax.Array, t: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, jnp.float32)


def euler_step(model_fn: ModelFn, x: jax.Array, t: jax.Array, dt: jax.Array) -> jax.Array:
    """x + dt v(x, t)."""
    return x + dt * velocity(for_step(model_fn, t), x, _tvec(x, t))


def heun_step(model_fn: ModelFn, x: jax.Array, t: jax.Array, dt: jax.Array) -> jax.Array:
    """Explicit trapezoid (torchdiffeq 'heun2'): k1 = v(x, t), k2 = v(x + dt k1, t + dt);
    returns x + dt (k1 + k2) / 2. Guidance (an interval) is decided from t for both evaluations, as REPA's Heun."""
    model_fn = for_step(model_fn, t)
    k1 = velocity(model_fn, x, _tvec(x, t))
    k2 = velocity(model_fn, x + dt * k1, _tvec(x, t + dt))
    return x + 0.5 * dt * (k1 + k2)


def ode_sample(
    model_fn: ModelFn,
    x0: jax.Array,
    num_steps: int = 50,
    method: str = "heun",
    t0: float = 0.0,
    t1: float = 1.0,
) -> jax.Array:
    """Integrate the probability-flow ODE from noise x0 at t0 to data at t1 on a fixed grid."""
    steps = {"euler": euler_step, "heun": heun_step}
    if method not in steps:
        raise ValueError(f"method must be one of {sorted(steps)}, got {method!r}")
    ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
    step = steps[method]

    def body(x: jax.Array, tt: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return step(model_fn, x, tt[0], tt[1] - tt[0]), None

    x, _ = jax.lax.scan(body, x0, (ts[:-1], ts[1:]))
    return x


def euler_maruyama_step(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    dt: jax.Array,
    w: jax.Array,
    form: str = "sigma",
    norm: float = 1.0,
) -> jax.Array:
    """x + drift(x, t) dt + sqrt(2 w(t)) sqrt(dt) w, with `w` standard normal noise."""
    tv = _tvec(x, t)
    mean = x + sde_drift(for_step(model_fn, t), x, tv, form, norm) * dt
    return mean + jnp.sqrt(2 * diffusion_coefficient(tv, x, form, norm)) * jnp.sqrt(dt) * w


def sde_sample(
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    num_steps: int = 250,
    form: str = "sigma",
    norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
    sample_eps: float = 0.0,
) -> jax.Array:
    """SiT `sample_sde` with Euler-Maruyama (defaults are SiT's sampling CLI defaults)."""
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
    if last_step is None:
        last_step_size = 0.0
    t0 = sample_eps if form == "SBDM" else 0.0
    if form == "SBDM" and t0 <= 0:
        raise ValueError("the SBDM diffusion is infinite at t = 0: pass sample_eps > 0")
    t1 = 1.0 - last_step_size if last_step_size > 0 else 1.0 - sample_eps
    ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
    dt = ts[1] - ts[0]

    def body(x: jax.Array, it: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        i, t = it
        w = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return euler_maruyama_step(model_fn, x, t, dt, w, form, norm), None

    x, _ = jax.lax.scan(body, x0, (jnp.arange(num_steps - 1), ts[:-1]))
    tv = _tvec(x, t1)
    model_fn = for_step(model_fn, jnp.float32(t1))  # the last step starts at t1
    if last_step == "Mean":
        x = x + sde_drift(model_fn, x, tv, form, norm) * last_step_size
    elif last_step == "Euler":
        x = x + velocity(model_fn, x, tv) * last_step_size
    elif last_step == "Tweedie":
        x = x / t1 + (1 - t1) ** 2 / t1 * score_from_velocity(velocity(model_fn, x, tv), x, tv)
    return x
