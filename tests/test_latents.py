"""Latent analysis: TwoNN recovers known intrinsic dimensions; PCA-to-RGB matches zelaki/eqvae's pca_to_rgb."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from eqvae_jax.eval import latents

torch = pytest.importorskip("torch")


def _embed(x: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate d-dimensional points into `dim` dimensions (a random orthogonal map)."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return np.pad(x, ((0, 0), (0, dim - x.shape[1]))) @ q + rng.normal(size=(1, dim))


@pytest.mark.parametrize("kind,d", [("subspace", 2), ("subspace", 4), ("subspace", 8), ("sphere", 3), ("sphere", 5)])
def test_twonn_recovers_known_dimension(kind, d):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(2000, d + (kind == "sphere")))
    if kind == "sphere":  # the unit d-sphere in R^(d+1)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    est = latents.twonn_dimension(_embed(x, 64, rng))
    print(f"TwoNN {kind} d={d} in R^64: {est:.2f}")
    assert abs(est - d) <= 0.1 * d


def test_twonn_matches_brute_force_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 20))
    dist = np.sort(cdist(x, x), axis=1)  # column 0 is the point itself
    mu = np.sort(dist[:, 2] / dist[:, 1])[: int(300 * 0.9)]
    xs, ys = np.log(mu), -np.log(1 - np.arange(1, len(mu) + 1) / 300)
    want = float(np.dot(xs, ys) / np.dot(xs, xs))
    r1, r2 = latents.two_nearest_distances(x, block=64)
    np.testing.assert_allclose(r1, dist[:, 1], rtol=1e-9)
    np.testing.assert_allclose(r2, dist[:, 2], rtol=1e-9)
    assert latents.twonn_dimension(x) == pytest.approx(want, rel=1e-9)
    with pytest.warns(UserWarning, match="duplicate"):
        latents.twonn_dimension(np.concatenate([x, x[:5]]))
    with pytest.raises(ValueError, match="N >= 3"):
        latents.twonn_dimension(x[:2])


def _reference_pca_to_rgb(z_nhwc: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """zelaki/eqvae evaluation/vis_latent.py pca_to_rgb (torch, NCHW in/out), with the eigenvector signs fixed by
    the same rule as ours (torch's signs are arbitrary)."""
    lat = torch.from_numpy(z_nhwc).permute(0, 3, 1, 2)
    b, c, h, w = lat.shape
    x = lat.permute(0, 2, 3, 1).reshape(-1, c).to(torch.float64)
    xc = x - x.mean(dim=0, keepdim=True)
    cov = (xc.T @ xc) / (xc.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)
    top3 = vecs[:, -3:]
    top3 = top3 * torch.sign(top3[top3.abs().argmax(dim=0), torch.arange(3)])
    rgb = (xc @ top3).reshape(b, h, w, 3).permute(0, 3, 1, 2)
    lo = rgb.reshape(b, -1).min(dim=1)[0].reshape(b, 1, 1, 1)
    hi = rgb.reshape(b, -1).max(dim=1)[0].reshape(b, 1, 1, 1)
    return ((rgb - lo) / (hi - lo + eps)).permute(0, 2, 3, 1).numpy()


def test_pca_rgb_matches_reference_and_upscales():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(4, 4))
    coeff = rng.normal(size=(3, 8, 8, 4)) * np.array([3.0, 2.0, 1.0, 0.1])  # distinct principal variances
    z = (coeff @ basis).astype(np.float32)
    got = latents.pca_rgb(z)
    want = np.clip(_reference_pca_to_rgb(z), 0, 1) * 255
    assert got.dtype == np.uint8 and got.shape == (3, 8, 8, 3)
    assert np.max(np.abs(got.astype(np.float64) - want)) <= 1.0  # truncation of nearly equal floats
    assert all(img.min() == 0 and img.max() >= 254 for img in got)  # per-image min-max
    big = latents.pca_rgb(z, size=32)
    assert big.shape == (3, 32, 32, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(latents.pca_rgb(z), got)  # deterministic signs
    with pytest.raises(ValueError, match=">= 3 channels"):
        latents.pca_rgb(z[..., :2])
