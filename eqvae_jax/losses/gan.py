"""GAN pieces of the reference objective (taming / LDM): hinge D loss, generator loss, adaptive weight, warm-up."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

DiscLoss = Literal["hinge", "vanilla"]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat)))) (taming's non-saturating variant)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def d_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: DiscLoss = "hinge") -> jax.Array:
    """The discriminator loss named by `kind`."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown discriminator loss {kind!r} (hinge or vanilla).")


def g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator loss -mean(D(x_hat)) (used with both D losses, as in the reference)."""
    return -jnp.mean(logits_fake)


def adaptive_weight(
    nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float, eps: float = 1e-4, max_weight: float = 1e4
) -> jax.Array:
    """disc_weight * stop_gradient(clip(||nll_grad|| / (||g_grad|| + eps), 0, max_weight)); grads w.r.t. the
    decoder's last layer (Frobenius norms, like torch.norm)."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight)) * disc_weight


def disc_factor(step: jax.Array | int, disc_start: int, factor: float = 1.0) -> jax.Array:
    """`factor` once step >= disc_start, else 0 (taming `adopt_weight`); step may be traced."""
    return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(factor), jnp.float32(0.0))
