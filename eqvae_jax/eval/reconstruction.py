"""Reconstruction metrics as the reference evaluates them (zelaki/eqvae eval.py).

- PSNR on the uint8 images the reference saves: `clamp(127.5 * x + 128, 0, 255)` truncated to uint8 (the +128,
  not +127.5, is the reference's), then 20 log10(255 / sqrt(MSE)) per image over all pixels and channels.
- SSIM as `torchmetrics.StructuralSimilarityIndexMeasure()` with default arguments on the unclamped [-1, 1]
  float images, one image at a time (the reference evaluates with batch 1, so the inferred data range is per
  image): 11x11 Gaussian window (sigma 1.5), reflect padding, k1 0.01, k2 0.03, averaged over the whole map.
- LPIPS: the VGG LPIPS in eval mode (no dropout) on unclamped images (`eqvae_jax.models.lpips`).
All functions take NHWC batches and return one value per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_uint8(x: jax.Array) -> jax.Array:
    """The reference's PNG quantisation of [-1, 1] images."""
    return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) of two [-1, 1] batches after the reference's uint8 quantisation."""
    a = to_uint8(x).astype(jnp.float32)
    b = to_uint8(y).astype(jnp.float32)
    mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
    return 20.0 * jnp.log10(255.0 / jnp.sqrt(mse))


def _gaussian_window(sigma: float) -> np.ndarray:
    size = int(3.5 * sigma + 0.5) * 2 + 1
    dist = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = np.exp(-((dist / sigma) ** 2) / 2)
    g = g / g.sum()
    return np.outer(g, g).astype(np.float32)


def _filter(x: jax.Array, window: jax.Array) -> jax.Array:
    """Depthwise 'valid' correlation of an NHWC batch with a 2-D window."""
    c = x.shape[-1]
    kernel = jnp.tile(window[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image SSIM of `x` (prediction) against `y` (target), torchmetrics' default definition."""
    window = jnp.asarray(_gaussian_window(SSIM_SIGMA))
    pad = (window.shape[0] - 1) // 2
    axes = (1, 2, 3)
    data_range = jnp.maximum(x.max(axis=axes) - x.min(axis=axes), y.max(axis=axes) - y.min(axis=axes))
    c1 = ((SSIM_K1 * data_range) ** 2)[:, None, None, None]
    c2 = ((SSIM_K2 * data_range) ** 2)[:, None, None, None]
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    xp = jnp.pad(x, widths, mode="reflect")
    yp = jnp.pad(y, widths, mode="reflect")
    mu_x, mu_y, e_xx, e_yy, e_xy = (_filter(t, window) for t in (xp, yp, xp * xp, yp * yp, xp * yp))
    var_x = jnp.maximum(e_xx - mu_x**2, 0.0)
    var_y = jnp.maximum(e_yy - mu_y**2, 0.0)
    cov = e_xy - mu_x * mu_y
    full = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return full.mean(axis=axes)  # torchmetrics averages the whole map (it crops only the CS term)
