"""The taming-transformers VQGAN autoencoder (`VQModel`) as Flax NNX modules, NHWC.

    vq = vq_vae.load(weights_dir)      # or vq_vae.build(vq_vae.taming_f16_n1024()) for random weights
    out = vq.encode(x)                 # x: float32 (B, H, W, 3) in [-1, 1]; H, W divisible by 2**(levels-1)
    out.latents                        # (B, h, w, embed_dim) pre-quantization features (after quant_conv)
    out.quantized, out.indices         # straight-through codebook vectors (NHWC), (B, h, w) int32 code indices
    x_rec = vq.decode(out.quantized)   # (B, H, W, 3) float32, [-1, 1] scale, not clipped
    x_rec = vq.decode_indices(out.indices)
    out = vq.quantize(latents)         # quantize given (e.g. transformed) latents: EQ-VQGAN's order

Architecture (taming `VQModel`): the LDM Encoder/Decoder trunk shared with the KL-VAE (`models.layers`), with
`double_z=False` (the encoder's conv_out gives z_channels) and attention blocks after every ResnetBlock of the
levels whose configured resolution is in `attn_resolutions`; quant_conv / post_quant_conv are 1x1 convs
z_channels -> embed_dim -> z_channels; `VectorQuantizer` has taming `VectorQuantizer2` semantics (below).
Attribute names are taming's state-dict names (`quantize.embedding.weight` is `quantize/embedding`), so the key
map in `eqvae_jax.convert.vq_vae` is nearly the identity.

Parameters are float32 (the codebook included: an `nnx.Param`, trained by the optimizer as in taming);
`dtype="bfloat16"` runs convs/matmuls of the trunk in bf16 while GroupNorm, the attention softmax, the latents
and the whole quantizer (distances, argmin, losses) stay float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.host_init import init_on_host
from eqvae_jax.models.layers import Decoder, Encoder, Trunk, conv
from eqvae_jax.typed_config import from_section

KIND = "vq_vae"


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Constructor arguments of `VQVAE` (JSON round-trippable; names follow taming's ddconfig where they exist).

    Level i has `base_channels * channel_mult[i]` channels; the downsampling factor is 2 ** (len(channel_mult)-1).
    Attention is decided by the configured `resolution` like LDM (see `layers.Trunk`), not by the input size.
    `beta` weighs the codebook term (`legacy=True`, taming's default and documented bug) or the commitment term.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    beta: float = 0.25
    legacy: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.channel_mult:
            raise ValueError("VQVAEConfig: channel_mult must have at least one level.")
        if self.n_embed < 1 or self.embed_dim < 1:
            raise ValueError(f"VQVAEConfig: n_embed and embed_dim must be positive, got {self.n_embed}, "
                             f"{self.embed_dim}.")
        jnp.dtype(self.dtype)  # fail early on an unknown dtype name

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def trunk(self) -> Trunk:
        """The shared LDM Encoder/Decoder shape (taming always has the mid attention)."""
        return Trunk(self.base_channels, self.channel_mult, self.num_res_blocks, True, self.attn_resolutions,
                     self.resolution, self.norm_num_groups, self.norm_eps, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VQVAEConfig:
        return from_section(cls, d)


def taming_f16_n1024(**overrides: Any) -> VQVAEConfig:
    """taming's ImageNet VQGAN f16 with 1024 codes (`configs/imagenet_vqgan.yaml`), the MaskGIT tokenizer that
    EQ-VAE fine-tunes: 72.142M parameters, 256^2 images -> 16x16 codes."""
    return dataclasses.replace(VQVAEConfig(), **overrides)


def tiny(**overrides: Any) -> VQVAEConfig:
    """A two-level f2 model for CPU tests: 32/64 channels, attention in the 16-resolution level, 64 codes."""
    cfg = VQVAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                      resolution=32, z_channels=8, embed_dim=8, n_embed=64)
    return dataclasses.replace(cfg, **overrides)


PRESETS = {"taming_f16_n1024": taming_f16_n1024, "tiny": tiny}


@flax.struct.dataclass
class VQEncoding:
    """What the quantizer gives for latents of shape (B, h, w, embed_dim); a pytree, all float32 but `indices`.

    latents        the quantizer's input (pre-quantization features, after quant_conv)
    quantized      latents + sg(codebook vector - latents): the codebook vectors, gradients straight through
    indices        (B, h, w) int32 code indices (argmin of the distance; the first index on ties)
    codebook_loss  taming's quantizer loss (scalar): mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2) with
                   legacy=True; beta on the first term otherwise
    """

    latents: jax.Array
    quantized: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array


class VectorQuantizer(nnx.Module):
    """taming `VectorQuantizer2` (remap=None): nearest codebook vector by ||z||^2 + ||e||^2 - 2 z.e, argmin,
    straight-through estimator, and the legacy loss placement (see `VQEncoding.codebook_loss`).

    The codebook `embedding` (n_embed, embed_dim) is an `nnx.Param` initialised uniform(-1/n_embed, 1/n_embed)
    as taming does. Everything here runs in float32 whatever the model's compute dtype.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True, *, rngs: nnx.Rngs):
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        bound = 1.0 / n_embed
        self.embedding = nnx.Param(jax.random.uniform(rngs.params(), (n_embed, embed_dim), jnp.float32,
                                                      -bound, bound))

    def host_init(self, rng: np.random.Generator) -> None:
        """`models.host_init` rule: the codebook drawn with numpy, uniform(-1/n_embed, 1/n_embed)."""
        bound = 1.0 / self.n_embed
        value = rng.uniform(-bound, bound, (self.n_embed, self.embed_dim))
        self.embedding.set_value(jnp.asarray(value, jnp.float32))

    def distances(self, z: jax.Array) -> jax.Array:
        """(B, h, w, n_embed) squared distances ||z||^2 + ||e||^2 - 2 z.e in taming's order of operations."""
        z = z.astype(jnp.float32)
        e = self.embedding[...]
        zz = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
        ee = jnp.sum(jnp.square(e), axis=-1)
        ze = jnp.einsum("bhwc,nc->bhwn", z, e, precision=jax.lax.Precision.HIGHEST)
        return (zz + ee) - 2.0 * ze

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook vectors of integer `indices` (any shape) -> indices.shape + (embed_dim,), float32."""
        return jnp.take(self.embedding[...], indices, axis=0)

    def __call__(self, z: jax.Array) -> VQEncoding:
        z = z.astype(jnp.float32)
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer: latents have {z.shape[-1]} channels, the codebook {self.embed_dim}.")
        indices = jnp.argmin(self.distances(z), axis=-1).astype(jnp.int32)
        z_q = self.lookup(indices)
        sg = jax.lax.stop_gradient
        to_codes = jnp.mean(jnp.square(sg(z_q) - z))  # moves the encoder (the "commitment" term)
        to_latents = jnp.mean(jnp.square(z_q - sg(z)))  # moves the codebook
        loss = to_codes + self.beta * to_latents if self.legacy else self.beta * to_codes + to_latents
        return VQEncoding(latents=z, quantized=z + sg(z_q - z), indices=indices, codebook_loss=loss)


class VQVAE(nnx.Module):
    """Encoder, quant_conv, VectorQuantizer, post_quant_conv, decoder (taming `VQModel` without its loss)."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        trunk = config.trunk()
        self.encoder = Encoder(trunk, config.in_channels, config.z_channels, rngs=rngs)
        self.decoder = Decoder(trunk, config.z_channels, config.out_channels, rngs=rngs)
        self.quant_conv = conv(config.z_channels, config.embed_dim, 1, padding=0, dtype=self.dtype, rngs=rngs)
        self.post_quant_conv = conv(config.embed_dim, config.z_channels, 1, padding=0, dtype=self.dtype, rngs=rngs)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta, config.legacy, rngs=rngs)

    def encode_latents(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_channels) in [-1, 1] -> float32 pre-quantization features (B, H/f, W/f, embed_dim)."""
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def encode(self, x: jax.Array) -> VQEncoding:
        """Encode and quantize: latents, quantized, indices, codebook_loss (see `VQEncoding`)."""
        return self.quantize(self.encode_latents(x))

    def decode(self, quantized: jax.Array) -> jax.Array:
        """(B, h, w, embed_dim) codebook vectors -> float32 image (B, h*f, w*f, out_channels), not clipped."""
        return self.decoder(self.post_quant_conv(quantized.astype(self.dtype))).astype(jnp.float32)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """(B, h, w) integer code indices -> float32 image (taming's `decode_code`, without its upstream bug)."""
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, VQEncoding]:
        """Reconstruct `x` through the codebook: (x_rec, encoding)."""
        out = self.encode(x)
        return self.decode(out.quantized), out

    def transformable_latent(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, None]:
        """(latent the EQ transform acts on, nothing for the loss): the pre-quantization features (EQ-VAE §3.3
        transforms E(x) before the codebook lookup); `key` is unused (deterministic encoder). The
        `losses.equivariance.LatentAutoencoder` protocol; quantize the transformed latent before `decode`."""
        del key
        return self.encode_latents(x), None


# ----------------------------------------------------------------------------------------- codebook statistics


def code_counts(indices: jax.Array, n_embed: int, mask: jax.Array | None = None) -> jax.Array:
    """(n_embed,) int32 number of occurrences of each code in `indices` ((B, ...)); sum over batches to
    accumulate before `codebook_usage` / `perplexity`. `mask` ((B,) bool) counts only the images where it is
    True (e.g. not the padding of a last evaluation batch)."""
    if mask is None:
        return jnp.bincount(jnp.ravel(indices), length=n_embed).astype(jnp.int32)
    weights = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (indices.ndim - 1)), indices.shape)
    return jnp.bincount(jnp.ravel(indices), weights=jnp.ravel(weights).astype(jnp.int32),
                        length=n_embed).astype(jnp.int32)


def codebook_usage(counts: jax.Array) -> jax.Array:
    """Fraction of the codebook used at least once, from `code_counts`."""
    return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the code distribution, from `code_counts`: taming's `VectorQuantizer` formula
    exp(-sum p log(p + 1e-10)); 1 when one code is used, n_embed when all are used equally."""
    p = counts.astype(jnp.float32) / jnp.maximum(jnp.sum(counts), 1)
    return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


# ------------------------------------------------------------------------------------------ build / load / save


def _init(config: VQVAEConfig, seed: int) -> VQVAE:
    """PyTorch's default init for convs, taming's for the codebook, drawn on the host with numpy
    (`models.host_init`)."""
    return init_on_host(abstract(config), seed)


# build(config=None, *, seed=0), abstract(config=None), load(path, **overrides) (e.g. dtype="bfloat16"; parameters
# stay float32), save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, VQVAEConfig, lambda config, rngs: VQVAE(config, rngs=rngs), init=_init)
