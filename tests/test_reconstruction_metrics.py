"""PSNR/SSIM against the reference implementations (numpy formula; torchmetrics' SSIM)."""

import numpy as np
import pytest
import torch
from torchmetrics.image import StructuralSimilarityIndexMeasure

from eqvae_jax.eval import reconstruction


def _pair(seed: int, shape=(3, 40, 48, 3)):
    rng = np.random.default_rng(seed)
    y = rng.uniform(-1, 1, shape).astype(np.float32)
    x = np.clip(y + rng.normal(0, 0.2, shape), -1.3, 1.3).astype(np.float32)  # unclamped like decoder output
    return x, y


def test_psnr_matches_reference_png_pipeline():
    x, y = _pair(0)
    got = np.asarray(reconstruction.psnr(x, y))
    a = np.clip(127.5 * x + 128, 0, 255).astype(np.uint8).astype(np.float64)
    b = np.clip(127.5 * y + 128, 0, 255).astype(np.uint8).astype(np.float64)
    want = 20 * np.log10(255 / np.sqrt(((a - b) ** 2).mean(axis=(1, 2, 3))))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("seed", [1, 2])
def test_ssim_matches_torchmetrics_per_image(seed):
    x, y = _pair(seed)
    got = np.asarray(reconstruction.ssim(x, y))
    for i in range(x.shape[0]):  # the reference evaluates one image at a time
        metric = StructuralSimilarityIndexMeasure()
        want = metric(torch.from_numpy(x[i : i + 1]).permute(0, 3, 1, 2),
                      torch.from_numpy(y[i : i + 1]).permute(0, 3, 1, 2)).item()
        assert abs(got[i] - want) < 1e-5, (i, got[i], want)


def test_ssim_identical_images_is_one_and_noise_lowers_it():
    x, y = _pair(3)
    assert np.allclose(np.asarray(reconstruction.ssim(y, y)), 1.0, atol=1e-6)
    assert np.all(np.asarray(reconstruction.ssim(x, y)) < 0.9)
