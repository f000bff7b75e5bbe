"""The high-frequency energy of latents against signals whose spectrum is known."""

import numpy as np
import pytest

from eqvae_jax.eval.spectrum import high_frequency_fraction, radial_frequency


def wave(size: int, ky: int, kx: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return np.cos(2 * np.pi * (ky * y + kx * x) / size)


def test_radial_frequency_units():
    r = radial_frequency(16, 16)
    assert r[0, 0] == 0.0
    assert r[0, 8] == pytest.approx(1.0)  # Nyquist along x
    assert r[8, 8] == pytest.approx(np.sqrt(2.0))


def test_known_spectra():
    size = 16
    low, high = wave(size, 0, 1), wave(size, 3, 5)  # radii 1/8 and sqrt(34)/8 ~ 0.73 of Nyquist
    assert high_frequency_fraction(low[None, :, :, None], 0.5) == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_fraction(high[None, :, :, None], 0.5) == pytest.approx(1.0)
    # amplitudes 1 and 2: power 1 : 4; a constant offset (DC) is removed and does not count
    mix = (low + 2 * high + 7.0)[None, :, :, None]
    assert high_frequency_fraction(mix, 0.5) == pytest.approx(0.8)
    # averaged over channels and images: a low channel (0) and a mixed channel (0.8) -> 0.4
    batch = np.stack([np.stack([low, mix[0, :, :, 0]], -1)] * 3)
    assert high_frequency_fraction(batch, 0.5) == pytest.approx(0.4)
    # the cutoff moves the boundary: at 0.1 both waves are above it
    assert high_frequency_fraction(mix, 0.1) == pytest.approx(1.0)


def test_constant_latents_rejected():
    with pytest.raises(ValueError, match="constant"):
        high_frequency_fraction(np.ones((2, 8, 8, 4)))
