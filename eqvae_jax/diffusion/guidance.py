"""Classifier-free guidance as pure functions around a model apply callable.

`guide_channels`: the reference DiT and SiT `forward_with_cfg` guide only the first 3 output channels
("for exact reproducibility reasons"; with 4 latent channels the 4th epsilon/velocity channel stays the
conditional prediction). Pass `guide_channels=3` to reproduce that; the default (None) guides all
`in_channels` prediction channels, the standard CFG. Learned-variance channels are never guided.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


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
