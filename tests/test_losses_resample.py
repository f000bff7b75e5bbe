"""Resize and rot90 match PyTorch (F.interpolate bilinear align_corners=False, torch.rot90 dims=[-1,-2])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqvae_jax.losses import resample

SCALES = tuple(range(8, 32))
resize = jax.jit(resample.resize, static_argnums=(1, 2))


def _torch_resize(x: np.ndarray, scale) -> np.ndarray:
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    return F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "shape,scales", [((2, 32, 32, 4), SCALES), ((1, 256, 256, 3), SCALES), ((1, 13, 21, 2), SCALES[::5])]
)
def test_resize_matches_torch_for_every_scale(shape, scales):
    """Latent (32) and image (256) sizes of SD-VAE at every scale; sizes where size*k/32 is fractional too."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    worst = 0.0
    for k in scales:
        got = np.asarray(resize(jnp.asarray(x), (k, k), 32))
        want = _torch_resize(x, k / 32)
        assert got.shape == want.shape, (k, got.shape, want.shape)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"{shape}: max abs err over {len(scales)} scales {worst:.2e}")
    assert worst <= 1e-5


def test_resize_equals_jax_image_resize_when_sizes_divide():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32, 32, 4)).astype(np.float32))
    for k in (8, 17, 31):
        want = jax.image.resize(x, (1, k, k, 4), method="linear", antialias=False)
        np.testing.assert_allclose(resample.resize(x, (k, k), 32), want, rtol=1e-5, atol=1e-6)  # a few ulps
    assert not np.allclose(resample.resize(x, (16, 16), 32), jax.image.resize(x, (1, 16, 16, 4), "linear"))


def test_anisotropic_resize_matches_torch_tuple_scale():
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(resample.resize(jnp.asarray(x), (12, 20), 32))
    want = _torch_resize(x, (12 / 32, 20 / 32))
    assert got.shape == want.shape == (2, 12, 20, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_matches_torch_exactly(k):
    x = np.random.default_rng(3).standard_normal((2, 5, 7, 3)).astype(np.float32)
    want = torch.rot90(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), k, dims=[-1, -2]).numpy()
    want = want.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(resample.rot90(jnp.asarray(x), k), want)
    parity = None if k == 0 else k % 2
    if parity is not None:
        np.testing.assert_array_equal(resample.rot90_traced(jnp.asarray(x), jnp.int32(k), parity), want)
    sq = x[:, :5, :5]
    want_sq = resample.rot90(jnp.asarray(sq), k)
    np.testing.assert_array_equal(resample.rot90_traced(jnp.asarray(sq), jnp.int32(k)), want_sq)


def test_traced_rotation_of_non_square_needs_parity():
    with pytest.raises(ValueError, match="parity"):
        resample.rot90_traced(jnp.zeros((1, 4, 6, 1)), jnp.int32(1))
