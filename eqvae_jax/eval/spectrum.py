"""The spectral argument of EQ-VAE: how much of a latent's energy sits at high spatial frequencies.

The paper (Kouzelis et al. 2025, section 3 and its spectral figure) argues that EQ fine-tuning removes
high-frequency components from the latents, which makes them easier to model. `high_frequency_fraction`
measures it per latent channel: the 2-D DFT power of the channel (its spatial mean removed, so the DC term does
not swamp the ratio) above a radial frequency cutoff, divided by the channel's total power; averaged over
channels and images. Frequencies are normalised by the Nyquist frequency: radius sqrt(fx^2 + fy^2) / 0.5 with
fx, fy in cycles per latent pixel (numpy `fftfreq`), so cutoff 0.5 is half of Nyquist along one axis.
"""

from __future__ import annotations

import numpy as np


def radial_frequency(h: int, w: int) -> np.ndarray:
    """(h, w) radial frequency of each DFT bin in units of the Nyquist frequency (0 at DC, sqrt(2) at the corner)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy**2 + fx**2) / 0.5


def high_frequency_fraction(latents: np.ndarray, cutoff: float = 0.5) -> float:
    """Mean over images and channels of (DFT power above `cutoff` x Nyquist) / (total DFT power), for NHWC
    latents (module docstring). Channels without any variation (zero power) are left out."""
    z = np.asarray(latents, np.float64)
    if z.ndim != 4:
        raise ValueError(f"expected NHWC latents, got shape {z.shape}")
    if not 0.0 <= cutoff < np.sqrt(2.0):
        raise ValueError(f"cutoff must be in [0, sqrt(2)) (units of Nyquist), got {cutoff}")
    z = z - z.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(z, axes=(1, 2))) ** 2  # (B, h, w, C)
    high = radial_frequency(z.shape[1], z.shape[2]) > cutoff
    total = power.sum(axis=(1, 2))
    above = power[:, high, :].sum(axis=1)
    valid = total > 1e-12 * max(float(total.max()), 1e-300)
    if not valid.any():
        raise ValueError("every latent channel is constant: no spectrum to measure")
    return float(np.mean(above[valid] / total[valid]))
