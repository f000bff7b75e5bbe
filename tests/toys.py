"""Small stand-in models for the loss tests (no tests here): a toy KL autoencoder (f=2) and a toy perceptual
distance with the interfaces of `kl_vae.KLVAE` and `lpips.LPIPS`, their PyTorch mirrors holding the same weights,
toy encoders that are / are not exactly rotation-equivariant, and the job's steps built on given modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from eqvae_jax.models.kl_vae import DiagonalGaussian
from eqvae_jax.models.lpips import normalize_channels
from eqvae_jax.train.eqvae import steps
from eqvae_jax.train.eqvae.config import EQVAEConfig, OptimConfig
from eqvae_jax.train.eqvae.networks import Networks

LATENT = 2


def _conv(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), rngs=rngs, bias_init=nnx.initializers.normal(0.1)
    )


def upsample2(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ToyDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv_in = _conv(LATENT, 8, 1, rngs)
        self.conv_out = _conv(8, 3, 1, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(upsample2(jax.nn.silu(self.conv_in(z))))


class ToyVAE(nnx.Module):
    """encode: stride-2 conv -> DiagonalGaussian; decode: conv, silu, nearest x2, conv_out (f=2)."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.encoder = _conv(3, 2 * LATENT, 2, rngs)
        self.decoder = ToyDecoder(rngs)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)


class ToyLPIPS(nnx.Module):
    """conv + relu features, unit-normalised, squared difference, [dropout], mean -> (B,).

    With few channels a pixel whose features are all nearly zero makes the unit normalisation (f / (|f| + 1e-10),
    as LPIPS) ill-conditioned: float32 results then depend on rounding. More `channels` make that rare.
    """

    def __init__(self, seed: int = 1, dropout_rate: float = 0.5, channels: int = 4):
        self.conv = _conv(3, channels, 1, nnx.Rngs(seed))
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, y: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        fx, fy = (normalize_channels(jax.nn.relu(self.conv(a))) for a in (x, y))
        diff = (fx - fy) ** 2
        if dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout_rate, diff.shape)
            diff = jnp.where(keep, diff / (1.0 - self.dropout_rate), 0.0)
        return jnp.mean(diff, axis=(1, 2, 3))


# ------------------------------------------------------------------------------------------ torch mirrors


def torch_conv(conv: nnx.Conv, stride: int = 1) -> torch.nn.Conv2d:
    k = np.asarray(conv.kernel[...])
    m = torch.nn.Conv2d(k.shape[2], k.shape[3], 3, stride=stride, padding=1)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
        m.bias.copy_(torch.from_numpy(np.array(conv.bias[...])))
    return m


class TorchToyDecoder(torch.nn.Module):
    def __init__(self, dec: ToyDecoder):
        super().__init__()
        self.conv_in, self.conv_out = torch_conv(dec.conv_in), torch_conv(dec.conv_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.interpolate(F.silu(self.conv_in(z)), scale_factor=2, mode="nearest"))


class TorchToyVAE(torch.nn.Module):
    def __init__(self, vae: ToyVAE):
        super().__init__()
        self.encoder = torch_conv(vae.encoder, stride=2)
        self.decoder = TorchToyDecoder(vae.decoder)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class TorchToyLPIPS(torch.nn.Module):
    def __init__(self, m: ToyLPIPS):
        super().__init__()
        self.conv = torch_conv(m.conv)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def feat(a):
            f = F.relu(self.conv(a))
            return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)

        return torch.mean((feat(x) - feat(y)) ** 2, dim=[1, 2, 3], keepdim=True)


# ------------------------------------------------------------------------- encoders for the eval metric


class PointwiseEncoder(nnx.Module):
    """2x2 average pool then a 1x1 channel map: exactly equivariant to quarter turns (on even sizes)."""

    def __init__(self, seed: int = 0):
        self.proj = nnx.Linear(3, 2 * LATENT, rngs=nnx.Rngs(seed))

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        b, h, w, c = x.shape
        pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return DiagonalGaussian.from_moments(self.proj(pooled))


class ConvEncoder(nnx.Module):
    """A stride-2 3x3 conv with a random (asymmetric) kernel: not rotation-equivariant."""

    def __init__(self, seed: int = 0):
        self.conv = _conv(3, 2 * LATENT, 2, nnx.Rngs(seed))

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.conv(x))


# ------------------------------------------------------------------ the production steps on given modules


def production_steps(vae: nnx.Module, lpips: nnx.Module | None, disc: nnx.Module, cfg, return_pair: bool = True):
    """(spec, state, lpips_state, generator_grads, discriminator_grads) for the given modules: the job's own
    StepSpec (`train.eqvae.steps.make_spec`, which resolves cfg.adaptive_weight_groups=0 to D's stats_groups),
    its initial state, and the job's `generator_grads` / `discriminator_grads` jitted with the plan static.

    generator_grads(state, lpips_state, images, rot_k, key, plan) -> (grads, terms, pair, disc_stats);
    discriminator_grads(state, images, rot_k, key, pair, plan) -> (grads, terms, disc_stats), to be called with
    the state of after the generator step (its `step` advanced by one, as the job does).
    """
    vgd, vparams = nnx.split(vae, nnx.Param)
    dgd, dparams, dstats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    lgd, lstate = nnx.split(lpips) if lpips is not None else (None, None)
    nets = Networks(vgd, vparams, getattr(vae, "config", None), dgd, dparams, dstats, disc.stats_groups, lgd, lstate)
    config = EQVAEConfig(loss=cfg, optim=OptimConfig(accumulate=1),
                         d_step_transform="shared" if return_pair else "redraw")
    spec = steps.make_spec(config, nets)
    state = steps.initial_state(spec, vparams, dparams, dstats)
    g = jax.jit(functools.partial(steps.generator_grads, spec), static_argnums=(5,))
    d = jax.jit(functools.partial(steps.discriminator_grads, spec), static_argnums=(5,))
    return spec, state, lstate, g, d
