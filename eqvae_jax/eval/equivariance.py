"""The paper's latent equivariance error: how far the encoder is from commuting with a spatial transform.

    err_tau(x) = ||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2

per image, averaged over images, for rotations by 90/180/270 degrees and downscaling by 0.25/0.5/0.75, reported
per transform and per family (rotation, scale: the mean of its transforms). E(x) is the posterior **mean**
(deterministic, so the metric measures the encoder and not the sampling noise; the reference code has no
implementation of this metric). tau is the training transform itself (`eqvae_jax.losses.resample`:
PyTorch-exact bilinear without antialias, rot90 in the reference direction), applied to latent and image.

    errors = equivariance_errors(lambda a: vae.encode(a).mean, images)   # {name: (B,)}, usable under jit
    with_families(means)   # per-transform means -> + {"rotation": ..., "scale": ..., "codes/rotation"}

VQ autoencoders (`vq_equivariance`): the same error on the pre-quantization features (E(x) is
`vq.encode(x).latents`, the features EQ-VQGAN transforms), plus, for rotations, the fraction of code indices
that commute with the transform: indices of quantize(rot(E(x))) against those of quantize(E(rot(x))), per image
("codes/rot90", ...; 1 = every code commutes). Rotations permute positions exactly, so this is the fraction of
positions whose nearest code survives the rotation of the image. Scales have no such count (the resized features
are interpolations, not codes of the resized image at the same positions in general).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.losses import resample

ROTATION, SCALE = "rotation", "scale"
CODES = "codes/"


@dataclasses.dataclass(frozen=True)
class EquivarianceEvalConfig:
    """Transforms of the metric: quarter turns, and scales as (numerator, denominator)."""

    rotations: tuple[int, ...] = (1, 2, 3)
    scales: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (3, 4))

    def transforms(self) -> dict[str, tuple[str, int | tuple[int, int]]]:
        """{name: (family, parameter)} in report order."""
        out: dict[str, tuple[str, int | tuple[int, int]]] = {f"rot{90 * k}": (ROTATION, k) for k in self.rotations}
        out.update({f"scale{n / d:g}": (SCALE, (n, d)) for n, d in self.scales})
        return out


def apply_transform(family: str, param: int | tuple[int, int], a: jax.Array) -> jax.Array:
    """One transform of the metric (a `transforms()` value) on NHWC images or latents."""
    if family == ROTATION:
        return resample.rot90(a, param)
    n, d = param
    return resample.resize(a, (n, n), d)


def equivariance_errors(
    encode: Callable[[jax.Array], jax.Array], x: jax.Array, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
) -> dict[str, jax.Array]:
    """{transform name: (B,) relative squared error} for NHWC images `x`; `encode(x)` returns the latent."""
    ex = encode(x)
    out = {}
    for name, (family, param) in cfg.transforms().items():
        want = encode(apply_transform(family, param, x))
        got = apply_transform(family, param, ex)
        if got.shape != want.shape:
            raise ValueError(
                f"{name}: tau(E(x)) has shape {got.shape} but E(tau(x)) {want.shape}; "
                "the image size must make the scaled sizes consistent with the encoder's stride."
            )
        out[name] = jnp.sum(jnp.square(got - want), axis=(1, 2, 3)) / jnp.sum(jnp.square(want), axis=(1, 2, 3))
    return out


def with_families(means: Mapping[str, float], cfg: EquivarianceEvalConfig = EquivarianceEvalConfig(),
                  prefix: str = "") -> dict[str, float]:
    """Per-transform means (keys `prefix + name`) plus the family means `prefix + 'rotation'` / `'scale'`, and for
    VQ code agreements (`prefix + 'codes/rot90'`, ...) their mean `prefix + 'codes/rotation'`."""
    out = dict(means)
    for family, head in ((ROTATION, ""), (SCALE, ""), (ROTATION, CODES)):
        names = [f"{prefix}{head}{n}" for n, (f, _) in cfg.transforms().items() if f == family]
        if names and all(n in means for n in names):
            out[f"{prefix}{head}{family}"] = float(np.mean([means[n] for n in names]))
    return out


def code_agreement(
    encode: Callable[[jax.Array], jax.Array],
    indices_of: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    cfg: EquivarianceEvalConfig = EquivarianceEvalConfig(),
) -> dict[str, jax.Array]:
    """{"codes/rotN": (B,) fraction of equal code indices} for each rotation of `cfg`: indices_of(rot(encode(x)))
    against indices_of(encode(rot(x))); `encode` gives pre-quantization features, `indices_of` (B, h, w) codes."""
    ex = encode(x)
    out = {}
    for name, (family, param) in cfg.transforms().items():
        if family != ROTATION:
            continue
        got = indices_of(apply_transform(family, param, ex))
        want = indices_of(encode(apply_transform(family, param, x)))
        if got.shape != want.shape:
            raise ValueError(f"{name}: code grids {got.shape} and {want.shape} differ; use square images.")
        out[f"{CODES}{name}"] = jnp.mean((got == want).astype(jnp.float32), axis=(1, 2))
    return out


def vq_equivariance(vq: nnx.Module, x: jax.Array, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
                    ) -> dict[str, jax.Array]:
    """Latent equivariance errors on the pre-quantization features and code agreement under rotations."""
    encode = lambda a: vq.encode(a).latents
    return {**equivariance_errors(encode, x, cfg), **code_agreement(encode, lambda z: vq.quantize(z).indices, x, cfg)}
