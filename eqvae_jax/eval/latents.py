"""Latent-space analysis: intrinsic dimension (TwoNN) and the PCA-to-RGB picture of latents.

- `twonn_dimension(points)`: Facco et al. 2017 (Sci. Rep. 7, 12140), the linear-fit variant of `skdim.id.TwoNN`:
  mu_i = r2_i / r1_i from each point's two nearest neighbours (Euclidean, the point itself excluded); keep the
  floor(N (1 - discard_fraction)) smallest mu (default: drop the largest 10%); with F_emp(mu_(i)) = i / N for
  the i-th smallest, fit -log(1 - F_emp) = d log(mu) by least squares through the origin:
  d = sum(x y) / sum(x x), x = log mu, y = -log(1 - F_emp). The EQ-VAE paper reports it for latents
  (SD-VAE 62.2 -> EQ-VAE 39.4): pass one row per image (flattened latents).
- `pca_rgb(latents)`: like zelaki/eqvae's `evaluation/vis_latent.py` `pca_to_rgb`: one PCA over the channel
  vectors of every latent pixel of the batch (mean-centred, covariance / (n - 1), `eigh`), projection on the top
  three principal components in eigh's ascending order (R = 3rd, G = 2nd, B = 1st), per-image min-max to [0, 1]
  (eps 1e-8), bilinear upscale, uint8 by truncation of x * 255. One deviation: each eigenvector's sign is fixed
  (largest-magnitude component positive) so the colours do not flip between runs or libraries.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def two_nearest_distances(points: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(r1, r2): Euclidean distances of each row to its nearest and second-nearest other row (float64)."""
    x = np.asarray(points, np.float64)
    x = x - x.mean(axis=0)  # distances are unchanged; the squared-norm expansion loses less to cancellation
    sq = np.einsum("ij,ij->i", x, x)
    r = np.empty((len(x), 2), np.float64)
    for start in range(0, len(x), block):
        stop = min(start + block, len(x))
        d2 = sq[start:stop, None] - 2.0 * (x[start:stop] @ x.T) + sq[None, :]
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        r[start:stop] = np.sort(np.partition(d2, 1, axis=1)[:, :2], axis=1)
    r = np.sqrt(np.maximum(r, 0.0))
    return r[:, 0], r[:, 1]


def twonn_dimension(points: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension of (N, D) points (module docstring)."""
    points = np.asarray(points)
    if points.ndim != 2 or len(points) < 3:
        raise ValueError(f"TwoNN needs (N, D) points with N >= 3, got shape {points.shape}.")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}.")
    r1, r2 = two_nearest_distances(points)
    duplicate = r1 <= 0.0
    if duplicate.any():
        warnings.warn(f"TwoNN: {int(duplicate.sum())} points have an exact duplicate (r1 = 0); they are left out.",
                      stacklevel=2)
        r1, r2 = r1[~duplicate], r2[~duplicate]
    n = len(r1)
    keep = int(n * (1.0 - discard_fraction))
    if keep < 2:
        raise ValueError(f"TwoNN: only {keep} ratios left to fit from {n} points.")
    mu = np.sort(r2 / r1)[:keep]
    x = np.log(mu)
    y = -np.log(1.0 - np.arange(1, keep + 1) / n)
    return float(np.dot(x, y) / np.dot(x, x))


def pca_rgb(latents: jax.Array | np.ndarray, size: int | tuple[int, int] | None = None,
            eps: float = 1e-8) -> np.ndarray:
    """(B, h, w, C) NHWC latents -> (B, H, W, 3) uint8 pictures (module docstring); `size` = (H, W) or an int for
    a square (default: the latent size, no upscale)."""
    z = jnp.asarray(latents, jnp.float32)
    if z.ndim != 4 or z.shape[-1] < 3:
        raise ValueError(f"pca_rgb expects NHWC latents with >= 3 channels, got shape {z.shape}.")
    b, h, w, c = z.shape
    x = z.reshape(-1, c)
    xc = x - x.mean(axis=0, keepdims=True)
    cov = jnp.matmul(xc.T, xc, precision="highest") / (xc.shape[0] - 1)
    _, vecs = jnp.linalg.eigh(cov)
    top3 = vecs[:, -3:]
    sign = jnp.sign(top3[jnp.argmax(jnp.abs(top3), axis=0), jnp.arange(3)])
    rgb = jnp.matmul(xc, top3 * jnp.where(sign == 0, 1.0, sign), precision="highest").reshape(b, h, w, 3)
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    rgb = (rgb - lo) / (hi - lo + eps)
    if size is not None:
        out_h, out_w = (size, size) if isinstance(size, int) else size
        rgb = jax.image.resize(rgb, (b, out_h, out_w, 3), method="bilinear")
    return np.asarray((jnp.clip(rgb, 0.0, 1.0) * 255.0).astype(jnp.uint8))
