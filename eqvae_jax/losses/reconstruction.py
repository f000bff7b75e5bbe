"""The reconstruction (NLL) and KL terms with the reference's reductions (LDM `contperceptual.py`).

Reference ('sum', the default): rec = |x - x_hat| + perceptual_weight * LPIPS (one value per image, broadcast to
every pixel and channel); nll = rec / exp(logvar) + logvar; nll_loss = sum(nll) / B, i.e. per image
sum|x - x_hat| + C*H*W*(perceptual_weight*LPIPS + logvar). KL = sum over the latent / B. Smaller (transformed)
targets therefore give proportionally smaller losses, as in the reference.

'mean' (an option, not the reference): the same elementwise terms averaged over all elements instead, so
nll_loss = mean|x - x_hat| + perceptual_weight*mean(LPIPS) (with logvar 0) and KL per latent element.
"""

from __future__ import annotations

from typing import Literal, Protocol

import jax
import jax.numpy as jnp

Reduction = Literal["sum", "mean"]
REDUCTIONS = ("sum", "mean")


class Posterior(Protocol):
    """What the losses need from the encoder's posterior (e.g. `kl_vae.DiagonalGaussian`)."""

    mean: jax.Array

    def kl(self) -> jax.Array: ...


def _check(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def nll_loss(
    target: jax.Array,
    recon: jax.Array,
    lpips: jax.Array,
    *,
    perceptual_weight: float = 1.0,
    logvar: float | jax.Array = 0.0,
    reduction: Reduction = "sum",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(nll_loss, terms) for NHWC target/recon and per-image LPIPS of shape (B,).

    terms: rec_l1 (mean |x - x_hat| per element), lpips (batch mean), rec_loss (mean of L1 + weighted LPIPS per
    element: the reference's logged `rec_loss`).
    """
    _check(reduction)
    l1 = jnp.abs(target - recon)
    rec = l1 + perceptual_weight * lpips.reshape(-1, 1, 1, 1)
    nll = rec / jnp.exp(logvar) + logvar
    loss = jnp.sum(nll) / nll.shape[0] if reduction == "sum" else jnp.mean(nll)
    return loss, {"rec_l1": jnp.mean(l1), "lpips": jnp.mean(lpips), "rec_loss": jnp.mean(rec)}


def kl_loss(posterior: Posterior, reduction: Reduction = "sum") -> jax.Array:
    """KL(q(z|x) || N(0, I)): summed over the latent and divided by B ('sum'), or per latent element ('mean')."""
    _check(reduction)
    kl = posterior.kl()
    loss = jnp.sum(kl) / kl.shape[0]
    if reduction == "mean":
        loss = loss / jnp.prod(jnp.asarray(posterior.mean.shape[1:]))
    return loss
