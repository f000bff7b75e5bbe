"""Training-time masking of VQ tokens and class-label drop, as valeoai/Maskgit-pytorch v1 does them.

v1 (`MaskGIT.get_mask_code`): per image r ~ U(0, 1) and a masking probability p = schedule(r); then every
token is masked independently with probability p (`U(0, 1) < p`) and replaced by the mask id (1024 for a
1024-code tokenizer). The number of masked tokens is therefore Binomial(256, p), not exactly p * 256.
Schedules, p as a function of r:

    arccos  arccos(r) / (pi / 2)     (v1's default; mean 2 / pi)
    cosine  cos(r * pi / 2)          (mean 2 / pi)
    linear  r                        (mean 1 / 2)
    square  r ** 2                   (mean 1 / 3)

arccos and cosine have the same mean but not the same distribution: P(p <= v) is 1 - cos(pi v / 2) for
arccos and 1 - (2 / pi) arccos(v) for cosine, which puts more weight on both extremes (E[p^2] 0.5 vs 0.46).
Label drop for classifier-free guidance: each label is dropped with probability 0.1 (v1's `--drop-label`);
the model then sees its dropped-label token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SCHEDULES = ("arccos", "cosine", "linear", "square")
# E[schedule(r)] for r ~ U(0, 1): the expected fraction of masked tokens.
EXPECTED_RATIO = {"arccos": 2 / math.pi, "cosine": 2 / math.pi, "linear": 0.5, "square": 1 / 3}
# E[schedule(r) ** 2]: with the mean, the spread of per-image ratios (int_0^1 arccos(r)^2 dr = pi - 2).
EXPECTED_RATIO_SQUARED = {"arccos": 4 * (math.pi - 2) / math.pi**2, "cosine": 0.5, "linear": 1 / 3, "square": 0.2}


def mask_probability(r: jax.Array, schedule: str = "arccos") -> jax.Array:
    """The per-image masking probability for uniform draws `r` (float32)."""
    r = jnp.asarray(r, jnp.float32)
    if schedule == "arccos":
        return jnp.arccos(r) / (math.pi * 0.5)
    if schedule == "cosine":
        return jnp.cos(r * math.pi * 0.5)
    if schedule == "linear":
        return r
    if schedule == "square":
        return r**2
    raise ValueError(f"unknown masking schedule {schedule!r}; one of {', '.join(SCHEDULES)}")


def mask_tokens(
    key: jax.Array, tokens: jax.Array, mask_id: int, schedule: str = "arccos"
) -> tuple[jax.Array, jax.Array]:
    """(masked tokens, mask) for tokens of shape (B, ...): mask True where the token became `mask_id`."""
    k_ratio, k_tokens = jax.random.split(key)
    b = tokens.shape[0]
    p = mask_probability(jax.random.uniform(k_ratio, (b,)), schedule)
    mask = jax.random.uniform(k_tokens, tokens.shape) < p.reshape((b,) + (1,) * (tokens.ndim - 1))
    return jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens), mask


def drop_labels(key: jax.Array, batch: int, rate: float = 0.1) -> jax.Array:
    """(batch,) bool, True for labels replaced by the dropped-label token (classifier-free guidance)."""
    return jax.random.uniform(key, (batch,)) < rate
