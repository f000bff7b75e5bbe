"""What the chain measures on each arm's latents beyond eval_vae: the high-frequency energy (eval/spectrum.py),
the latent scale the DiT stage normalises by, and the pictures of latents.png (PCA, decoded transformed latents).

Latents are posterior means of the held-out shapes images (the same images eval_vae scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.eval.latents import pca_rgb
from eqvae_jax.eval.shapes_metric import render_set
from eqvae_jax.eval.spectrum import high_frequency_fraction
from eqvae_jax.losses import resample
from eqvae_jax.models import kl_vae

ROTATION = 1  # quarter turns in the picture
SCALE = (1, 2)  # numerator, denominator of the scale in the picture


def encode_means(vae: kl_vae.KLVAE, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Posterior means (N, h, w, C) of uint8 images."""
    graphdef, state = nnx.split(vae)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x.astype(jnp.float32) / 127.5 - 1.0).mean)
    return np.concatenate([np.asarray(fn(state, jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def to_unit(x: jax.Array | np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def upscale(x: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (N, h, w, 3) to (N, size, size, 3), to show small images at one size."""
    f = size // x.shape[1]
    return np.repeat(np.repeat(x, f, axis=1), f, axis=2) if f > 1 else x


def analyse(weights: dict[str, str], image_size: int, shapes_seed: int, count: int, batch_size: int,
            cutoff: float, previews: int) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """({arm: {hf_energy, latent_std, scaling_factor}}, picture rows) for the arms' weights dirs."""
    images, _ = render_set(shapes_seed, "validation", count, image_size)
    shown = images[:previews]
    rows = {"input": shown.astype(np.float32) / 255.0,
            "input rot90": np.asarray(resample.rot90(jnp.asarray(shown, jnp.float32), ROTATION)) / 255.0}
    small = np.asarray(resample.resize(jnp.asarray(shown, jnp.float32), (SCALE[0],) * 2, SCALE[1])) / 255.0
    rows["input x0.5"] = upscale(np.clip(small, 0, 1), image_size)
    results = {}
    for arm, path in weights.items():
        vae = kl_vae.load(path)
        z = encode_means(vae, images, batch_size)
        std = float(z.std())
        results[arm] = {"hf_energy": high_frequency_fraction(z, cutoff), "hf_cutoff": cutoff, "latent_std": std,
                        "scaling_factor": 1.0 / max(std, 1e-8)}
        zp = jnp.asarray(z[:previews])
        rows[f"{arm} latent PCA"] = pca_rgb(zp, image_size).astype(np.float32) / 255.0
        rows[f"{arm} D(rot90 z)"] = to_unit(vae.decode(resample.rot90(zp, ROTATION)))
        scaled = resample.resize(zp, (SCALE[0],) * 2, SCALE[1])
        rows[f"{arm} D(z x0.5)"] = upscale(to_unit(vae.decode(scaled)), image_size)
    return results, rows
