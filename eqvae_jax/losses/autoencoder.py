"""The KL-autoencoder objective of the reference (LDM `LPIPSWithDiscriminator`), as pure functions.

    recon, last_layer_vjp = decode_with_last_layer(vae, z, cfg.last_layer)
    total, terms = generator_loss(target, recon, last_layer_vjp, posterior, lpips, disc, step, cfg, lpips_key)
    d_total, d_terms = discriminator_loss(disc, target, recon, step, cfg)

generator (optimizer 0): nll_loss + kl_weight * kl + d_weight * disc_factor(step) * g_loss, with
d_weight = disc_weight * sg(clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4)) and W the decoder's last conv kernel.
Everything but the KL term is `adversarial_generator_loss`, which the VQ objective (`losses.vq`) shares.
discriminator (optimizer 1): disc_factor(step) * hinge(D(sg(x)), D(sg(x_hat))), real and fake in two D calls
(so train-mode BatchNorm normalises each with its own batch statistics, as in the reference).

Adaptive weight per group (`LossConfig.adaptive_weight_groups`): the reference runs DDP on 8 GPUs x 10 images,
and each GPU computes d_weight from the gradients of ITS OWN nll and g_loss (torch.autograd.grad on its 10
images); DDP then averages the per-GPU gradients. With the micro-batch split into G equal contiguous groups,
each group g gets d_weight_g from its own nll_g (sum over its pixels / its size) and g_g = -mean(its logits), and
the generator objective is mean_g(nll_g + kl_weight * kl_g + d_weight_g * factor * g_g), which for equal groups
is nll + kl_weight * kl + factor * mean_g(d_weight_g * g_g). One weight from the whole batch (G = 1) is larger:
the norm of an averaged gradient shrinks more for the noisy GAN term than for the reconstruction term.

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
    perceptual_weight: float = 1.0  # VGG LPIPS
    logvar: float = 0.0  # never trained
    disc_weight: float = 0.5  # x the adaptive weight at decoder/conv_out
    disc_factor: float = 1.0
    disc_start: int = 0  # GAN from the first update (the original kl-f8 training used 50001)
    disc_loss: str = "hinge"
    reduction: str = "sum"  # sum over C*H*W / B, LPIPS broadcast to every pixel
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    lpips_dropout: bool = True  # the reference's LPIPS runs in train mode: Dropout(0.5) before each lin head
    last_layer: tuple[str, ...] = DECODER_LAST_LAYER
    # One adaptive GAN weight per group of the micro-batch (the reference: one per GPU of 10 images, see the
    # module docstring). 0 = the discriminator's BatchNorm statistics groups (its `stats_groups`; 1 for a
    # discriminator without them); 1 = one weight for the whole micro-batch; G = G equal contiguous groups.
    adaptive_weight_groups: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "last_layer", tuple(self.last_layer))
        if self.adaptive_weight_groups < 0:
            raise ValueError(f"LossConfig.adaptive_weight_groups must be >= 0, got {self.adaptive_weight_groups}.")
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
    adaptive_weight_groups: int


def adaptive_groups(cfg: AdversarialConfig, disc: nnx.Module) -> int:
    """The resolved group count of the adaptive weight: cfg.adaptive_weight_groups, 0 = D's `stats_groups`."""
    return cfg.adaptive_weight_groups or int(getattr(disc, "stats_groups", 1) or 1)


def _check_groups(batch: int, groups: int) -> None:
    if groups < 1 or batch % groups:
        raise ValueError(f"adaptive_weight_groups={groups} must divide the batch size {batch}.")


def _group_masks(batch: int, groups: int) -> jax.Array:
    """(groups, batch) bool: image i belongs to group i // (batch / groups)."""
    _check_groups(batch, groups)
    return (jnp.arange(batch) // (batch // groups))[None, :] == jnp.arange(groups)[:, None]


def _per_group(ct: jax.Array, masks: jax.Array) -> jax.Array:
    """(G, B, ...): G * ct restricted to each group's images (the cotangent of that group's mean term)."""
    groups = masks.shape[0]
    keep = masks.reshape(masks.shape + (1,) * (ct.ndim - 1))
    return jnp.where(keep, groups * ct[None], jnp.zeros((), ct.dtype))


def grouped_adaptive_weight(
    nll_ct: jax.Array,
    logits_fake: jax.Array,
    disc_vjp: Callable[[jax.Array], jax.Array],
    last_layer_vjp: Callable[[jax.Array], jax.Array],
    groups: int,
    disc_stats_groups: int | None,
    cfg: AdversarialConfig,
) -> tuple[jax.Array, jax.Array]:
    """((groups,) adaptive GAN weights, one per equal contiguous group of the batch (module docstring), and
    (groups, *recon.shape) d g_g / d recon, each group's GAN loss's gradient, for the total's gradient).

    nll_ct: d nll / d recon of the whole batch; logits_fake, disc_vjp: D's output on recon and its VJP to recon;
    last_layer_vjp: recon cotangent -> gradient w.r.t. the decoder's last kernel W. The nll is a sum of
    per-image terms, so group g's nll cotangent is G * (nll_ct on g's images, 0 elsewhere). The same holds for
    the GAN term when D couples images only inside groups of the adaptive groups: train-mode BatchNorm with
    `disc_stats_groups` a multiple of `groups` (block-diagonal Jacobian); then one D backward serves every
    group. Otherwise (D statistics over larger groups, or a D that does not say) each group's logits
    cotangent goes through its own D backward (vmapped: G D backwards, always correct). Per group: two
    last-layer weight gradients (vmapped over the 2G masked cotangents), then `gan.adaptive_weight`.
    """
    masks = _group_masks(nll_ct.shape[0], groups)
    g_ct = jnp.full_like(logits_fake, -1.0 / logits_fake.size)  # d g_loss / d logits, whole batch
    block_diagonal = groups == 1 or (bool(disc_stats_groups) and disc_stats_groups % groups == 0)
    if block_diagonal:
        g_cts = _per_group(disc_vjp(g_ct), masks)
    else:
        g_cts = jax.vmap(disc_vjp)(_per_group(g_ct, masks))
    grads = jax.vmap(last_layer_vjp)(jnp.concatenate([_per_group(nll_ct, masks), g_cts]))

    def weight(nll_grad: jax.Array, g_grad: jax.Array) -> jax.Array:
        return gan.adaptive_weight(nll_grad, g_grad, cfg.disc_weight, cfg.adaptive_eps, cfg.adaptive_max)

    return jax.vmap(weight)(grads[:groups], grads[groups:]), g_cts


def with_gradient(value: jax.Array, x: jax.Array, grad: jax.Array) -> jax.Array:
    """`value`, differentiated as a function of `x` alone whose gradient is `grad` (d value / d x, computed already).

    The generator objective needs d nll / d recon and d g_loss / d recon twice: for the adaptive weight, and in
    the gradient of the total. The reference (and plain autodiff of the total) runs the LPIPS and discriminator
    backwards for each; the second is the first scaled by the total's cotangent, so it is taken from here.
    `value` and `grad` are stopped: nothing is differentiated through the computation that made them (not even
    with a zero cotangent).
    """
    return _value_with_gradient(jax.lax.stop_gradient(value), x, jax.lax.stop_gradient(grad))


@jax.custom_vjp
def _value_with_gradient(value: jax.Array, x: jax.Array, grad: jax.Array) -> jax.Array:
    return value


def _value_with_gradient_fwd(value: jax.Array, x: jax.Array,
                             grad: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return value, (grad, value)


def _value_with_gradient_bwd(res: tuple[jax.Array, jax.Array],
                             ct: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    grad, value = res
    return jnp.zeros_like(value), (ct * grad).astype(grad.dtype), jnp.zeros_like(grad)


_value_with_gradient.defvjp(_value_with_gradient_fwd, _value_with_gradient_bwd)


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
    None, or cfg.disc_factor == 0 (LDM's static switch), d_weight is 0. The adaptive weight is computed per group
    of `adaptive_groups(cfg, disc)` and the GAN term is factor * mean_g(d_weight_g * g_g) (module docstring).
    `regularizer` is already weighted and stays differentiable. The total's gradient flows through `recon` and
    `regularizer` only (`with_gradient`): target, LPIPS, D and logvar are constants of it, as in the reference's
    generator step. terms: total, nll, rec_l1, lpips, rec_loss,
    g_loss, d_weight (mean over groups), d_weight_min, d_weight_max, disc_factor (scalars), and d_weight_groups
    (the (G,) weights); nothing to differentiate.
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
    nll_ct = nll_vjp(jnp.ones_like(nll))[0]  # d nll / d recon: the one LPIPS backward of the step
    logits_fake, disc_vjp = vjp_wrt_input(disc, recon)
    if logits_fake.size == 0:
        raise ValueError(f"the discriminator gives no logits for {recon.shape} images; the image is too small for it.")
    groups = adaptive_groups(cfg, disc)
    _check_groups(recon.shape[0], groups)
    g_groups = jax.vmap(gan.g_loss)(logits_fake.reshape(groups, -1))  # groups are contiguous: one row each
    if last_layer_vjp is None or cfg.disc_factor <= 0.0:
        d_weights, gan_ct = jnp.zeros((groups,), jnp.float32), jnp.zeros_like(recon)
    else:
        d_weights, g_cts = grouped_adaptive_weight(nll_ct, logits_fake, disc_vjp, last_layer_vjp, groups,
                                                   getattr(disc, "stats_groups", None), cfg)
        gan_ct = jnp.tensordot(d_weights, g_cts, axes=1) / groups  # d mean_g(d_weight_g * g_g) / d recon
    factor = gan.disc_factor(step, cfg.disc_start, cfg.disc_factor)
    g = jnp.mean(g_groups)
    # Both terms carry the recon gradients computed above for the adaptive weight (one LPIPS and one D backward
    # per step; `with_gradient`); d_weights and the factor are constants of the gradient, as in the reference.
    gan_term = factor * jnp.mean(d_weights * g_groups)
    total = with_gradient(nll, recon, nll_ct) + regularizer + with_gradient(gan_term, recon, factor * gan_ct)
    sg = jax.lax.stop_gradient
    terms = {
        "total": sg(total),
        "nll": sg(nll),
        **{k: sg(v) for k, v in nll_terms.items()},
        "g_loss": sg(g),
        "d_weight": jnp.mean(d_weights),
        "d_weight_min": jnp.min(d_weights),
        "d_weight_max": jnp.max(d_weights),
        "d_weight_groups": d_weights,
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
    `adversarial_generator_loss` with regularizer kl_weight * KL. terms: those of `adversarial_generator_loss`
    plus kl and logvar.
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
