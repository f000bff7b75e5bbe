"""Classifier-free guidance as pure functions around a model apply callable.

`guide_channels`: the reference DiT and SiT `forward_with_cfg` guide only the first 3 output channels
("for exact reproducibility reasons"; with 4 latent channels the 4th epsilon/velocity channel stays the
conditional prediction). Pass `guide_channels=3` to reproduce that; the default (None) guides all
`in_channels` prediction channels, the standard CFG. Learned-variance channels are never guided.

Guidance interval (REPA, sihyun-yu/REPA `samplers.py`, `--guidance-low/--guidance-high`): guide only while the
noise level is within [low, high], in REPA's time tau that runs from 1 (noise) to 0 (data). The SiT samplers here
run t from 0 (noise) to 1 (data), so tau = 1 - t. REPA decides once per sampler step, from the step's start time
t_cur, for every model evaluation of the step (Heun's second evaluation at t_next too); `IntervalGuidance.at` is
that per-step decision and the flow samplers (`flow_sampling`) call it through `for_step`. Outside the interval
only the conditional model runs (`lax.cond`: no unconditional half computed), as in REPA.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
FULL_INTERVAL = (0.0, 1.0)  # guide at every noise level (no interval)


def guide(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array, channels: int) -> jax.Array:
    """`cond` with its first `channels` channels replaced by uncond + scale * (cond - uncond)."""
    g = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
    return jnp.concatenate([g, cond[..., channels:]], axis=-1)


def cfg_model_fn(
    apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    y: jax.Array,
    null_label: int,
    scale: float | jax.Array,
    in_channels: int,
    guide_channels: int | None = None,
) -> ModelFn:
    """A `model_fn(x, t)` for the samplers that runs `apply(x, t, labels)` on [x; x] with [y; null] labels
    in one batch and returns the guided prediction for x (batch N, not 2N)."""
    n = in_channels if guide_channels is None else guide_channels

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        labels = jnp.concatenate([y, jnp.full_like(y, null_label)])
        out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
        cond, uncond = jnp.split(out, 2, axis=0)
        return guide(cond, uncond, scale, n)

    return model_fn


def conditional_model_fn(
    apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], y: jax.Array
) -> ModelFn:
    """`model_fn(x, t)` without guidance (cfg scale 1 in the reference samples this way)."""
    return lambda x, t: apply(x, t, y)


def in_interval(t: jax.Array, interval: tuple[float, float]) -> jax.Array:
    """bool: is flow time t (0 = noise, 1 = data) inside the guidance interval [low, high] of REPA's time
    tau = 1 - t? Closed at both ends, as REPA's `t_cur <= guidance_high and t_cur >= guidance_low`."""
    tau = 1.0 - jnp.asarray(t, jnp.float32)
    return (tau >= interval[0]) & (tau <= interval[1])


class IntervalGuidance:
    """A `model_fn(x, t)` that is `guided` inside the guidance interval and `conditional` outside (module
    docstring). Called directly it decides per row from each row's t (both predictions computed, then selected);
    `at(t_step)` decides once for a whole sampler step, running only the branch it needs."""

    def __init__(self, guided: ModelFn, conditional: ModelFn, interval: tuple[float, float]) -> None:
        self.guided, self.conditional, self.interval = guided, conditional, (float(interval[0]), float(interval[1]))

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        inside = in_interval(t, self.interval).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(inside, self.guided(x, t), self.conditional(x, t))

    def at(self, t_step: jax.Array) -> ModelFn:
        """The model_fn of every evaluation of a step that starts at flow time `t_step` (a scalar)."""
        inside = in_interval(t_step, self.interval)
        return lambda x, t: jax.lax.cond(inside, self.guided, self.conditional, x, t)


def for_step(model_fn: ModelFn, t_step: jax.Array) -> ModelFn:
    """What a flow sampler step starting at `t_step` evaluates: an interval-guided model decides once from
    t_step (REPA's samplers); any other model_fn is returned as is."""
    return model_fn.at(t_step) if isinstance(model_fn, IntervalGuidance) else model_fn


def interval_cfg_model_fn(
    apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    y: jax.Array,
    null_label: int,
    scale: float | jax.Array,
    in_channels: int,
    interval: tuple[float, float],
    guide_channels: int | None = None,
) -> IntervalGuidance:
    """`cfg_model_fn` inside the guidance interval (REPA's time, module docstring), the conditional model alone
    outside it."""
    if not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"the guidance interval must satisfy 0 <= low <= high <= 1, got {tuple(interval)}")
    return IntervalGuidance(cfg_model_fn(apply, y, null_label, scale, in_channels, guide_channels),
                            conditional_model_fn(apply, y), interval)
