"""The KL-autoencoder objective of the reference (LDM `LPIPSWithDiscriminator`), as pure functions.

    recon, last_layer_vjp = decode_with_last_layer(vae, z, cfg.last_layer)
    total, terms = generator_loss(target, recon, last_layer_vjp, posterior, lpips, disc, step, cfg, lpips_key)
    d_total, d_terms = discriminator_loss(disc, target, recon, step, cfg)

generator (optimizer 0): nll_loss + kl_weight * kl + d_weight * disc_factor(step) * g_loss, with
d_weight = disc_weight * sg(clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4)) and W the decoder's last conv kernel.
Everything but the KL term is `adversarial_generator_loss`, which the VQ objective (`losses.vq`) shares.
discriminator (optimizer 1): disc_factor(step) * hinge(D(sg(x)), D(sg(x_hat))), real and fake in two D calls
(so train-mode BatchNorm normalises each with its own batch statistics, as in the reference).

Models are passed in: `lpips(x, y, dropout_key=None) -> (B,)`; `disc` an NNX module `disc(x) -> logits` in the
mode the caller chose (the reference: BatchNorm in train mode; its running statistics are updated in place, so a
jitted step merges D with `nnx.merge(..., copy=True)` inside its loss function and returns `nnx.state(disc,
nnx.BatchStat)`). logvar is a frozen constant (the reference never trains it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from eqvae_jax.losses import gan
from eqvae_jax.losses.nnx_vjp import vjp_wrt_input, vjp_wrt_variable
from eqvae_jax.losses.reconstruction import REDUCTIONS, Posterior, kl_loss, nll_loss

LpipsFn = Callable[..., jax.Array]
DECODER_LAST_LAYER = ("decoder", "conv_out", "kernel")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the objective; defaults are the EQ-VAE fine-tuning config (zelaki/eqvae eqvae_config.yaml:
    kl_weight 1e-6, disc_weight 0.5, disc_start 0, hinge, LPIPS 1.0 in train mode). Hashable: a static arg."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    logvar: float = 0.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 0
    disc_loss: str = "hinge"
    reduction: str = "sum"
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    lpips_dropout: bool = True  # the reference's LPIPS runs in train mode: Dropout(0.5) before each lin head
    last_layer: tuple[str, ...] = DECODER_LAST_LAYER

    def __post_init__(self) -> None:
        object.__setattr__(self, "last_layer", tuple(self.last_layer))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"LossConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}.")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"LossConfig.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}.")


def decode_with_last_layer(
    vae: nnx.Module, z: jax.Array, last_layer: Sequence[str | int] = DECODER_LAST_LAYER
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(vae.decode(z), ct -> dL/dW): one decoder forward; the VJP only reaches the last layer W (see nnx_vjp)."""
    return vjp_wrt_variable(vae, last_layer, lambda m: m.decode(z))


def _lpips(lpips: LpipsFn, target: jax.Array, recon: jax.Array, key: jax.Array | None) -> jax.Array:
    return lpips(target, recon) if key is None else lpips(target, recon, dropout_key=key)


class AdversarialConfig(Protocol):
    """What `adversarial_generator_loss` and `discriminator_loss` read from a loss config (`LossConfig`, or
    `losses.vq.VQLossConfig`)."""

    perceptual_weight: float
    logvar: float
    reduction: str
    disc_weight: float
    disc_factor: float
    disc_start: int
    disc_loss: str
    adaptive_eps: float
    adaptive_max: float


def adversarial_generator_loss(
    target: jax.Array,
    recon: jax.Array,
    last_layer_vjp: Callable[[jax.Array], jax.Array] | None,
    lpips: LpipsFn,
    disc: nnx.Module,
    step: jax.Array | int,
    cfg: AdversarialConfig,
    lpips_key: jax.Array | None = None,
    regularizer: jax.Array | float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, terms) with total = nll + regularizer + d_weight * disc_factor(step) * g_loss: the generator
    objective shared by the KL (`generator_loss`: regularizer kl_weight * KL) and VQ
    (`losses.vq.vq_generator_loss`: codebook_weight * codebook loss) autoencoders.

    nll uses cfg.reduction ('sum' / B for LDM's KL model, 'mean' for taming's VQ model). `last_layer_vjp` maps a
    cotangent of `recon` to the gradient w.r.t. the decoder's last kernel (from `decode_with_last_layer`); with
    None, or cfg.disc_factor == 0 (LDM's static switch), d_weight is 0. `regularizer` is already weighted and
    stays differentiable. terms: total, nll, rec_l1, lpips, rec_loss, g_loss, d_weight, disc_factor (scalars,
    nothing to differentiate).
    """

    def nll_of(r: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return nll_loss(
            target,
            r,
            _lpips(lpips, target, r, lpips_key),
            perceptual_weight=cfg.perceptual_weight,
            logvar=cfg.logvar,
            reduction=cfg.reduction,
        )

    nll, nll_vjp, nll_terms = jax.vjp(nll_of, recon, has_aux=True)
    logits_fake, disc_vjp = vjp_wrt_input(disc, recon)
    if logits_fake.size == 0:
        raise ValueError(f"the discriminator gives no logits for {recon.shape} images; the image is too small for it.")
    g = gan.g_loss(logits_fake)
    if last_layer_vjp is None or cfg.disc_factor <= 0.0:
        d_weight = jnp.float32(0.0)
    else:
        nll_grad = last_layer_vjp(nll_vjp(jnp.ones_like(nll))[0])
        g_grad = last_layer_vjp(disc_vjp(jnp.full_like(logits_fake, -1.0 / logits_fake.size)))
        d_weight = gan.adaptive_weight(nll_grad, g_grad, cfg.disc_weight, cfg.adaptive_eps, cfg.adaptive_max)
    factor = gan.disc_factor(step, cfg.disc_start, cfg.disc_factor)
    total = nll + regularizer + d_weight * factor * g
    sg = jax.lax.stop_gradient
    terms = {
        "total": sg(total),
        "nll": sg(nll),
        **{k: sg(v) for k, v in nll_terms.items()},
        "g_loss": sg(g),
        "d_weight": d_weight,
        "disc_factor": factor,
    }
    return total, terms


def generator_loss(
    target: jax.Array,
    recon: jax.Array,
    last_layer_vjp: Callable[[jax.Array], jax.Array] | None,
    posterior: Posterior,
    lpips: LpipsFn,
    disc: nnx.Module,
    step: jax.Array | int,
    cfg: LossConfig,
    lpips_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, terms): the reference generator objective for one (target, reconstruction) pair.

    `posterior` is that of the encoder's actual input (its KL is the KL term); the rest is
    `adversarial_generator_loss` with regularizer kl_weight * KL. terms: total, nll, rec_l1, lpips, rec_loss, kl,
    g_loss, d_weight, disc_factor, logvar (all scalars, nothing to differentiate).
    """
    kl = kl_loss(posterior, cfg.reduction)
    total, terms = adversarial_generator_loss(target, recon, last_layer_vjp, lpips, disc, step, cfg, lpips_key,
                                              regularizer=cfg.kl_weight * kl)
    terms.update(kl=jax.lax.stop_gradient(kl), logvar=jnp.float32(cfg.logvar))
    return total, terms


def discriminator_loss(
    disc: nnx.Module, target: jax.Array, recon: jax.Array, step: jax.Array | int, cfg: AdversarialConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(d_loss, terms): disc_factor * D loss on D(sg(target)) then D(sg(recon)), two separate calls.

    terms: disc_loss, logits_real, logits_fake (means), as the reference logs them.
    """
    logits_real = disc(jax.lax.stop_gradient(target))
    logits_fake = disc(jax.lax.stop_gradient(recon))
    loss = gan.disc_factor(step, cfg.disc_start, cfg.disc_factor) * gan.d_loss(logits_real, logits_fake, cfg.disc_loss)
    sg = jax.lax.stop_gradient
    return loss, {
        "disc_loss": sg(loss),
        "logits_real": sg(jnp.mean(logits_real)),
        "logits_fake": sg(jnp.mean(logits_fake)),
    }
