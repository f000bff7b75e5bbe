"""Autoencoders side by side on a few images: what the demo notebooks show, as arrays (plots: eqvae_jax.viz).

    table = equivariance_table({"SD-VAE": sd, "EQ-VAE": eq}, images)          # {model: {transform: error}}
    recs = reconstruct(eq, images)                                            # D(E(x)), [-1, 1]
    decoded = decode_transformed_latents(eq, images, ("identity", "rot90", "scale0.5"))  # D(tau(E(x)))
    targets = transform_images(images, ("identity", "rot90", "scale0.5"))                # tau(x)

`decode_transformed_latents` next to `transform_images` is the EQ-VAE paper's Figure 1 in miniature: a latent
that is not equivariant decodes to artefacts once it is rotated or downscaled, an equivariant one to the
transformed image. Everything uses the posterior mean E(x) (deterministic) and the metric's own transforms
(`eval.equivariance.apply_transform`: PyTorch-exact bilinear resize without antialias, rot90 in the reference
direction). Images are float32 NHWC in [-1, 1]; their side must make every scaled size a multiple of the
autoencoder's downsampling factor (e.g. 128 or 256 px for SD-VAE, whose factor is 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.eval import latents
from eqvae_jax.eval.equivariance import EquivarianceEvalConfig, apply_transform, equivariance_errors, with_families
from eqvae_jax.models.kl_vae import KLVAE

IDENTITY = "identity"
FIGURE1 = (IDENTITY, "rot90", "scale0.5")  # the columns of the paper's Figure 1 in miniature
_NAMED = EquivarianceEvalConfig().transforms()  # rot90/180/270, scale0.25/0.5/0.75


@nnx.jit
def _encode_mean(vae: KLVAE, x: jax.Array) -> jax.Array:
    return vae.encode(x).mean


@nnx.jit
def _decode(vae: KLVAE, z: jax.Array) -> jax.Array:
    return vae.decode(z)


def encode_mean(vae: KLVAE, images: np.ndarray | jax.Array) -> jax.Array:
    """The posterior mean E(x) of NHWC images in [-1, 1] (one compiled program per model and image shape)."""
    return _encode_mean(vae, jnp.asarray(images, jnp.float32))


def reconstruct(vae: KLVAE, images: np.ndarray | jax.Array) -> np.ndarray:
    """D(E(x)) clipped to [-1, 1], on the host."""
    return np.clip(np.asarray(_decode(vae, encode_mean(vae, images))), -1.0, 1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)), axis=(1, 2, 3))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def equivariance_table(
    vaes: Mapping[str, KLVAE], images: np.ndarray | jax.Array, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
) -> dict[str, dict[str, float]]:
    """{model name: {transform: mean error, 'rotation': family mean, 'scale': family mean}} of the paper's
    ||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2 over `images` (eval.equivariance)."""
    x = jnp.asarray(images, jnp.float32)
    table = {}
    for name, vae in vaes.items():
        errors = equivariance_errors(lambda a, vae=vae: encode_mean(vae, a), x, cfg)
        table[name] = with_families({k: float(np.mean(np.asarray(v))) for k, v in errors.items()}, cfg)
    return table


def _transform(name: str, a: jax.Array) -> jax.Array:
    if name == IDENTITY:
        return a
    if name not in _NAMED:
        raise ValueError(f"unknown transform {name!r}; expected {IDENTITY!r} or one of {sorted(_NAMED)}.")
    return apply_transform(*_NAMED[name], a)


def transform_images(images: np.ndarray | jax.Array, names: Sequence[str] = FIGURE1) -> dict[str, np.ndarray]:
    """{transform: tau(x)} for transform names 'identity', 'rot90/180/270', 'scale0.25/0.5/0.75'."""
    x = jnp.asarray(images, jnp.float32)
    return {n: np.asarray(_transform(n, x)) for n in names}


def decode_transformed_latents(vae: KLVAE, images: np.ndarray | jax.Array,
                               names: Sequence[str] = FIGURE1) -> dict[str, np.ndarray]:
    """{transform: D(tau(E(x)))} clipped to [-1, 1]: the transformed latent decoded (compare with tau(x))."""
    z = encode_mean(vae, images)
    return {n: np.clip(np.asarray(_decode(vae, _transform(n, z))), -1.0, 1.0) for n in names}


def latent_pictures(vaes: Mapping[str, KLVAE], images: np.ndarray | jax.Array,
                    size: int | None = None) -> dict[str, np.ndarray]:
    """{model name: uint8 (B, size, size, 3)} PCA-to-RGB pictures of each model's latents (eval.latents.pca_rgb:
    one PCA per model over all latent pixels of the batch; default size: the images' own)."""
    size = size or int(np.shape(images)[1])
    return {name: latents.pca_rgb(encode_mean(vae, images), size) for name, vae in vaes.items()}
