"""REPA (Yu et al., ICLR 2025) pieces for a SiT/DiT backbone: projector, alignment loss, teacher input.

REPA aligns the SiT hidden tokens after block `encoder_depth` (8 for SiT-XL/2), passed through a small MLP,
with a frozen DINOv2-B/14's patch tokens of the same image:

    out, h = sit(x_t, t, y, tap=8)                  # models.dit: h (B, 256, hidden) after block 8
    z_tilde = projector(h)                          # (B, 256, 768)
    z = teacher(preprocess_raw_image(raw))["x_norm_patchtokens"]   # raw: the uint8 256 px crop, (B, 256, 768)
    loss = denoising_loss + 0.5 * projection_loss([z], [z_tilde])

Everything here follows sihyun-yu/REPA (`models/sit.py` build_mlp, `loss.py` SILoss, `train.py`
preprocess_raw_image); numerics are checked against transcriptions of those in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

PROJECTOR_DIM = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN / STD, what REPA normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


class Projector(nnx.Module):
    """REPA's `build_mlp`: Linear(hidden, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, z_dim).

    Trainable (`nnx.Param`), owned by the SiT model next to its blocks. REPA initialises it with the SiT's
    `_basic_init`: xavier-uniform weights, zero biases. Attribute names `linear_{0,2,4}` are the torch
    Sequential indices (`projectors.0.{0,2,4}.weight` in a REPA checkpoint). Matmuls in `dtype`, output float32.
    """

    def __init__(self, hidden_size: int, z_dim: int = 768, projector_dim: int = PROJECTOR_DIM, *,
                 dtype: str = "float32", rngs: nnx.Rngs):
        def linear(din: int, dout: int) -> nnx.Linear:
            return nnx.Linear(din, dout, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, kernel_init=_xavier,
                              bias_init=_zeros, rngs=rngs)

        self.linear_0 = linear(hidden_size, projector_dim)
        self.linear_2 = linear(projector_dim, projector_dim)
        self.linear_4 = linear(projector_dim, z_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.silu(self.linear_0(x))
        x = nnx.silu(self.linear_2(x))
        return self.linear_4(x).astype(jnp.float32)


def _normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) along the last axis (F.normalize), written so its gradient stays finite at 0."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), NORMALIZE_EPS**2))
    return x / norm


def projection_loss(zs: Sequence[jax.Array], zs_tilde: Sequence[jax.Array]) -> jax.Array:
    """REPA's `proj_loss`: mean over tokens of -cos(z, z~) per sample and encoder, summed, / (n_enc * B).

    `zs` are the teachers' tokens, `zs_tilde` the projected student tokens, one (B, N, D) array per encoder.
    Equal to the mean of -cos over encoders, samples and tokens; a float32 scalar. The weight (REPA's
    `proj_coeff`, 0.5) is the caller's.
    """
    if len(zs) != len(zs_tilde) or not zs:
        raise ValueError(f"projection_loss: {len(zs)} teacher and {len(zs_tilde)} projected feature sets")
    total = jnp.zeros((), jnp.float32)
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        if z.shape != z_tilde.shape or z.ndim != 3:
            raise ValueError(f"projection_loss: teacher {z.shape} vs projected {z_tilde.shape}; need equal (B, N, D)")
        cos = jnp.sum(_normalize(z) * _normalize(z_tilde), axis=-1)  # (B, N)
        total = total + jnp.sum(jnp.mean(-cos, axis=-1))
    return total / (len(zs) * zs[0].shape[0])


def teacher_input_size(tokens_per_side: int, patch_size: int = 14) -> int:
    """Teacher input side whose patch grid equals the student's token grid: 14 * 16 = 224 for SiT/2 on f8
    latents of 256 px images, 448 at 512 px, i.e. REPA's `224 * (resolution // 256)` wherever REPA runs; other
    grids (a tiny model, SiT/4) get the size that still gives one teacher token per student token."""
    return tokens_per_side * patch_size


def preprocess_raw_image(images: jax.Array, size: int | None = None) -> jax.Array:
    """REPA's `preprocess_raw_image` for DINOv2: uint8 NHWC (B, R, R, 3) -> float32 (B, S, S, 3), S = 224 * (R // 256).

    x / 255, then (x - ImageNet mean) / ImageNet std, then torch's `F.interpolate(x, S, mode='bicubic')`
    (align_corners False, no antialias; a=-0.75 with replicated edges) as `jax.image.resize` method
    "bicubic-pytorch" (plain "bicubic" would be a different kernel). In that order, as REPA does. `size`
    replaces REPA's S (see `teacher_input_size`).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"preprocess_raw_image expects square NHWC RGB images, got {images.shape}")
    size = 224 * (images.shape[2] // 256) if size is None else size
    if size <= 0:
        raise ValueError(f"preprocess_raw_image: resolution {images.shape[2]} < 256 gives no output (pass a size)")
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic-pytorch", antialias=False)


def teacher_features(teacher: nnx.Module, images: jax.Array, size: int | None = None) -> jax.Array:
    """DINOv2 patch tokens (B, N, D) of raw uint8 crops, as REPA's target (no gradient flows into them)."""
    return jax.lax.stop_gradient(teacher(preprocess_raw_image(images, size))["x_norm_patchtokens"])
