"""The LDM / diffusers `AutoencoderKL` (SD-VAE and relatives) as Flax NNX modules, NHWC.

    vae = kl_vae.load(weights_dir)     # or kl_vae.build(kl_vae.sd_vae()) for random weights
    posterior = vae.encode(x)          # x: float32 (B, H, W, 3) in [-1, 1]; H, W divisible by 2**(levels-1)
    z = posterior.sample(key)          # or posterior.mode() == posterior.mean
    x_rec = vae.decode(z)              # (B, H, W, 3) float32, [-1, 1] scale, not clipped

Attribute names are the LDM state-dict names (CompVis `ldm/modules/diffusionmodules/model.py`), so NNX
paths read like LDM keys: `encoder/down/0/block/1/nin_shortcut/kernel` is
`encoder.down.0.block.1.nin_shortcut.weight`; `decoder/up/3/...` is the lowest-resolution decoder level
(LDM indexes decoder levels like the encoder's, diffusers reverses them); `encoder/mid/attn_1/{q,k,v,...}`.
LDM names were chosen over diffusers' because EQ-VAE trains from LDM checkpoints. The explicit key maps to
both layouts live in `eqvae_jax.convert.kl_vae`.

The decoder's last conv, used for the adaptive GAN weight, is `vae.decoder.conv_out.kernel` (an `nnx.Param`).

Architecture switches (`KLVAEConfig`) cover SD-VAE (f8c4), SDXL-VAE (same shape) and SD3/FLUX-style
16-channel VAEs without quant convs. Parameters are float32; `dtype="bfloat16"` runs convs/matmuls in bf16
while GroupNorm and the attention softmax stay float32; the posterior and decoded image are always float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.host_init import init_on_host
from eqvae_jax.models.layers import Decoder, Encoder, Trunk, conv
from eqvae_jax.typed_config import from_section

KIND = "kl_vae"
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class KLVAEConfig:
    """Constructor arguments of `KLVAE` (JSON round-trippable; field names follow LDM's ddconfig).

    Level i has `base_channels * channel_mult[i]` channels; the spatial downsampling factor is
    2 ** (len(channel_mult) - 1). `scaling_factor`/`shift_factor` map posterior samples to diffusion latents:
    `(z - shift_factor) * scaling_factor` (see `KLVAE.normalize_latents`).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    sample_size: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult:
            raise ValueError("KLVAEConfig: channel_mult must have at least one level.")
        jnp.dtype(self.dtype)  # fail early on an unknown dtype name

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def trunk(self) -> Trunk:
        """The shared LDM Encoder/Decoder shape (no attention inside the levels, as in every KL-VAE)."""
        return Trunk(self.base_channels, self.channel_mult, self.num_res_blocks, self.mid_attention,
                     norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, dtype=self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KLVAEConfig:
        return from_section(cls, d)


def sd_vae(**overrides: Any) -> KLVAEConfig:
    """Stable Diffusion 1.x/2.x VAE and LDM kl-f8 (f8, 4 latent channels); the EQ-VAE starting point."""
    return dataclasses.replace(KLVAEConfig(), **overrides)


def sdxl_vae(**overrides: Any) -> KLVAEConfig:
    """SDXL VAE: the SD-VAE shape with its own scaling factor."""
    return dataclasses.replace(KLVAEConfig(scaling_factor=0.13025, sample_size=1024), **overrides)


def sd3_vae(**overrides: Any) -> KLVAEConfig:
    """SD3-style VAE: 16 latent channels, no quant/post-quant convs, latents shifted then scaled."""
    cfg = KLVAEConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
    return dataclasses.replace(cfg, **overrides)


def tiny(**overrides: Any) -> KLVAEConfig:
    """A two-level f2 model with 32/64 channels for CPU tests (same block types as SD-VAE)."""
    cfg = KLVAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, sample_size=32)
    return dataclasses.replace(cfg, **overrides)


PRESETS = {"sd_vae": sd_vae, "sdxl_vae": sdxl_vae, "sd3_vae": sd3_vae, "tiny": tiny}


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (NHWC, float32); a pytree."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split the encoder output channels into (mean, logvar) and clip logvar to [-30, 20] like LDM."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps with eps ~ N(0, I) drawn from `key` (reparameterised, differentiable)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) = 0.5 * sum_{H,W,C}(mean^2 + var - 1 - logvar) per example: shape (B,)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class KLVAE(nnx.Module):
    """Encoder, quant_conv, DiagonalGaussian posterior, post_quant_conv, decoder (LDM `AutoencoderKL`)."""

    def __init__(self, config: KLVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        lat = config.latent_channels
        trunk = config.trunk()
        self.encoder = Encoder(trunk, config.in_channels, 2 * lat, rngs=rngs)
        self.decoder = Decoder(trunk, lat, config.out_channels, rngs=rngs)
        self.quant_conv = (conv(2 * lat, 2 * lat, 1, padding=0, dtype=self.dtype, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (conv(lat, lat, 1, padding=0, dtype=self.dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: (B, H, W, in_channels) in [-1, 1] -> posterior over (B, H/f, W/f, latent_channels)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: (B, h, w, latent_channels) -> float32 image (B, h*f, w*f, out_channels), not clipped."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruct `x` from a posterior sample (the mode when `key` is None): (x_rec, posterior)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    def transformable_latent(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """(latent the EQ-VAE transform acts on, posterior for the KL term): a posterior sample (the mode when
        `key` is None), which `decode` takes as is (the `losses.equivariance.LatentAutoencoder` protocol)."""
        posterior = self.encode(x)
        return (posterior.mode() if key is None else posterior.sample(key)), posterior

    def normalize_latents(self, z: jax.Array) -> jax.Array:
        """Posterior sample -> diffusion-model latent: (z - shift_factor) * scaling_factor."""
        return normalize_latents(z, self.config.scaling_factor, self.config.shift_factor)

    def denormalize_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `normalize_latents`, applied before `decode`."""
        return denormalize_latents(latents, self.config.scaling_factor, self.config.shift_factor)


def normalize_latents(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """(z - shift_factor) * scaling_factor: what a diffusion model trained on this VAE's latents sees. Jobs that
    only hold the factors (a latent cache records them) call this; with a model, use the methods."""
    return (z - shift_factor) * scaling_factor


def denormalize_latents(latents: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """latents / scaling_factor + shift_factor: the inverse of `normalize_latents`, before decoding."""
    return latents / scaling_factor + shift_factor


def _init(config: KLVAEConfig, seed: int) -> KLVAE:
    """PyTorch's default init, drawn on the host with numpy (`models.host_init`; eager jax.random init compiles a
    program per weight shape and takes ~20 s)."""
    return init_on_host(abstract(config), seed)


# build(config=None, *, seed=0), abstract(config=None), load(path, **overrides) (e.g. dtype="bfloat16"; parameters
# stay float32), save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, KLVAEConfig, lambda config, rngs: KLVAE(config, rngs=rngs), init=_init)
