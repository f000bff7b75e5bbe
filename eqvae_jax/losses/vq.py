"""The VQGAN objective (taming `VQLPIPSWithDiscriminator`, hinge, no conditioning) as pure functions.

    recon, last_layer_vjp = decode_with_last_layer(vq, encoding.quantized, cfg.last_layer)
    total, terms = vq_generator_loss(target, recon, last_layer_vjp, encoding.codebook_loss, lpips, disc, step, cfg)
    d_total, d_terms = discriminator_loss(disc, target, recon, step, cfg)   # losses.autoencoder's, unchanged

generator (optimizer 0): nll + d_weight * disc_factor(step) * g_loss + codebook_weight * codebook_loss, with
nll = mean(|x - x_hat| + perceptual_weight * LPIPS) (a MEAN over pixels and channels, where the KL model sums),
g_loss = -mean(D(x_hat)), d_weight = disc_weight * sg(clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4)) with W the
decoder's last conv kernel, and codebook_loss the quantizer's (`models.vq_vae.VQEncoding.codebook_loss`: beta on
the codebook term, taming's legacy placement). Everything but the codebook term is
`losses.autoencoder.adversarial_generator_loss`, shared with the KL objective (one place for the adaptive weight).
discriminator (optimizer 1): disc_factor(step) * hinge(D(sg(x)), D(sg(x_hat))), two D calls, as for the KL model.

Differences from taming, both in logged values only: d_weight is logged as 0 when cfg.disc_factor == 0 (taming
still computes it; it is multiplied by 0 either way), and LPIPS is one term `lpips` (taming logs `p_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

from eqvae_jax.losses.autoencoder import (
    DECODER_LAST_LAYER,
    LpipsFn,
    adversarial_generator_loss,
    decode_with_last_layer,
    discriminator_loss,
)
from eqvae_jax.losses.reconstruction import REDUCTIONS

__all__ = ["VQLossConfig", "decode_with_last_layer", "discriminator_loss", "vq_generator_loss"]


@dataclasses.dataclass(frozen=True)
class VQLossConfig:
    """Weights of the VQGAN objective; defaults are taming's `imagenet_vqgan.yaml` but for `disc_start`.

    disc_start defaults to 0, not taming's 250001: that number counts from the step of the upstream run, which
    trained the autoencoder alone for 250k steps and then switched the GAN on. EQ-VQGAN fine-tunes a finished
    VQGAN (whose discriminator sits in the same checkpoint, `loss.discriminator.*`) with a step counter that
    starts at 0, so 250001 would keep the GAN off for 250k steps, longer than any fine-tune; 0 continues the
    upstream run's regime, as the EQ-VAE code does for its KL fine-tune (disc_start 0, where LDM's kl-f8 had
    50001). A fine-tune with a freshly initialised discriminator may want a warm-up instead: set it here.

    Hashable: a static argument of a jitted step. `logvar` is 0 (taming's VQ loss has none).
    """

    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    disc_start: int = 0
    disc_loss: str = "hinge"
    reduction: str = "mean"
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    lpips_dropout: bool = True  # taming's LPIPS has Dropout(0.5) before each lin head, on in training mode
    last_layer: tuple[str, ...] = DECODER_LAST_LAYER
    # One adaptive GAN weight per group of the micro-batch, as losses.autoencoder.LossConfig (0 = the
    # discriminator's BatchNorm groups, i.e. one weight per reference GPU; 1 = the whole micro-batch).
    adaptive_weight_groups: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "last_layer", tuple(self.last_layer))
        if self.adaptive_weight_groups < 0:
            raise ValueError(f"VQLossConfig.adaptive_weight_groups must be >= 0, got {self.adaptive_weight_groups}.")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"VQLossConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}.")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"VQLossConfig.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}.")

    @property
    def logvar(self) -> float:
        return 0.0


def vq_generator_loss(
    target: jax.Array,
    recon: jax.Array,
    last_layer_vjp: Callable[[jax.Array], jax.Array] | None,
    codebook_loss: jax.Array,
    lpips: LpipsFn,
    disc: nnx.Module,
    step: jax.Array | int,
    cfg: VQLossConfig,
    lpips_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, terms): taming's generator objective for one (target, reconstruction) pair.

    `codebook_loss` is the quantizer's loss of the latents that were quantized (differentiable: it trains the
    encoder and the codebook). terms: total, nll, rec_l1, lpips, rec_loss, codebook_loss, g_loss, d_weight,
    disc_factor (scalars, nothing to differentiate).
    """
    total, terms = adversarial_generator_loss(target, recon, last_layer_vjp, lpips, disc, step, cfg, lpips_key,
                                              regularizer=cfg.codebook_weight * codebook_loss)
    terms["codebook_loss"] = jax.lax.stop_gradient(codebook_loss)
    return total, terms
