"""The paper's latent equivariance error: how far the encoder is from commuting with a spatial transform.

    err_tau(x) = ||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2

per image, averaged over images, for rotations by 90/180/270 degrees and downscaling by 0.25/0.5/0.75, reported
per transform and per family (rotation, scale). E(x) is the posterior **mean** (deterministic, so the metric
measures the encoder and not the sampling noise; the reference code has no implementation of this metric).
tau is the training transform itself (`eqvae_jax.losses.resample`: PyTorch-exact bilinear without antialias,
rot90 in the reference direction), applied to the latent and to the image.

    fn = make_equivariance_fn(vae)            # jitted over (state, images); batch may be sharded
    meter = EquivarianceMeter()
    for x in batches: meter.update(fn(x))
    meter.result()   # {"equivariance/rotation": ..., "equivariance/scale": ..., "equivariance/rot90": ...}

VQ autoencoders (`make_vq_equivariance_fn`): the same error on the pre-quantization features (E(x) is
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


def _apply(family: str, param: int | tuple[int, int], a: jax.Array) -> jax.Array:
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
        want = encode(_apply(family, param, x))
        got = _apply(family, param, ex)
        if got.shape != want.shape:
            raise ValueError(
                f"{name}: tau(E(x)) has shape {got.shape} but E(tau(x)) {want.shape}; "
                "the image size must make the scaled sizes consistent with the encoder's stride."
            )
        out[name] = jnp.sum(jnp.square(got - want), axis=(1, 2, 3)) / jnp.sum(jnp.square(want), axis=(1, 2, 3))
    return out


def make_equivariance_fn(
    vae: nnx.Module, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted `images -> {name: (B,) errors}` using the posterior mean of `vae.encode`."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state: nnx.State, x: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state)
        return equivariance_errors(lambda a: model.encode(a).mean, x, cfg)

    return lambda x: run(state, x)


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
        got = indices_of(_apply(family, param, ex))
        want = indices_of(encode(_apply(family, param, x)))
        if got.shape != want.shape:
            raise ValueError(f"{name}: code grids {got.shape} and {want.shape} differ; use square images.")
        out[f"{CODES}{name}"] = jnp.mean((got == want).astype(jnp.float32), axis=(1, 2))
    return out


def vq_equivariance(vq: nnx.Module, x: jax.Array, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
                    ) -> dict[str, jax.Array]:
    """Latent equivariance errors on the pre-quantization features and code agreement under rotations."""
    encode = lambda a: vq.encode(a).latents
    return {**equivariance_errors(encode, x, cfg), **code_agreement(encode, lambda z: vq.quantize(z).indices, x, cfg)}


def make_vq_equivariance_fn(
    vq: nnx.Module, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted `images -> {name: (B,) values}` of `vq_equivariance` (errors and "codes/rotN" agreements)."""
    graphdef, state = nnx.split(vq)

    @jax.jit
    def run(state: nnx.State, x: jax.Array) -> dict[str, jax.Array]:
        return vq_equivariance(nnx.merge(graphdef, state), x, cfg)

    return lambda x: run(state, x)


class EquivarianceMeter:
    """Accumulates per-image errors over batches; `result()` gives per-transform and per-family means."""

    def __init__(self, cfg: EquivarianceEvalConfig = EquivarianceEvalConfig()):
        self.cfg = cfg
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def update(self, errors: Mapping[str, jax.Array]) -> None:
        for name, e in errors.items():
            e = np.asarray(e, np.float64)
            self._sums[name] = self._sums.get(name, 0.0) + float(e.sum())
            self._counts[name] = self._counts.get(name, 0) + e.size

    def result(self, prefix: str = "equivariance/") -> dict[str, float]:
        """Per-name means, plus per-family means of the errors (rotation, scale) and of the code agreements
        ("codes/rotation")."""
        per = {n: self._sums[n] / self._counts[n] for n in self._sums}
        out = {f"{prefix}{n}": v for n, v in per.items()}
        transforms = self.cfg.transforms().items()
        for family, head in ((ROTATION, ""), (SCALE, ""), (ROTATION, CODES)):
            names = [f"{head}{n}" for n, (f, _) in transforms if f == family and f"{head}{n}" in per]
            if names:
                total = sum(self._sums[n] for n in names)
                out[f"{prefix}{head}{family}"] = total / sum(self._counts[n] for n in names)
        return out
