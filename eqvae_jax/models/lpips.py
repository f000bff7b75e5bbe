"""LPIPS (VGG16 variant, lpips v0.1): a frozen perceptual distance between NHWC images in [-1, 1].

    from eqvae_jax.models import lpips
    m = lpips.load(path)            # weights directory from `python -m eqvae_jax.convert --kind lpips`
    d = m(x, y)                     # (batch,), deterministic: the reference's eval mode
    d = m(x, y, dropout_key=key)    # Dropout(0.5) before each lin head, as in the reference's training mode

Pipeline (= `lpips.LPIPS(net='vgg')`): scaling layer, VGG16 features tapped after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, unit-normalisation over channels (eps 1e-10), squared difference, [dropout], a 1x1 "lin"
conv without bias, spatial mean, sum over the five taps.

Every weight is a `Frozen` variable (no `nnx.Param`), so optimizers never see it. Dropout is not module state:
it is on exactly when a `dropout_key` is passed, which keeps `m(x, y, dropout_key=k)` a pure function of its
arguments inside `jax.jit` (e.g. `nnx.merge(graphdef, state)(x, y, dropout_key=k)` in a train step). The
reference keeps this dropout on while training (PyTorch Lightning's `model.train()` recurses into the loss),
so a faithful train step passes a fresh key per step; evaluation passes none.

`build(seed=seed)` builds a randomly initialised network without any file in well under a second (tests);
`LPIPS(rngs=nnx.Rngs(0))` draws the same distributions with jax.random (one XLA compile per weight shape).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.max_pool import max_pool_2x2
from eqvae_jax.models.variables import Frozen

KIND = "lpips"

# The lpips v0.1 ScalingLayer constants (buffers `scaling_layer.shift/scale`, never trained).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor

# VGG16 configuration "D" up to relu5_3: (name, torchvision `features` index, in_ch, out_ch); "pool" = 2x2
# max-pool.
VGG16_LAYERS: tuple[tuple[str, int, int, int] | str, ...] = (
    ("conv1_1", 0, 3, 64), ("conv1_2", 2, 64, 64), "pool",
    ("conv2_1", 5, 64, 128), ("conv2_2", 7, 128, 128), "pool",
    ("conv3_1", 10, 128, 256), ("conv3_2", 12, 256, 256), ("conv3_3", 14, 256, 256), "pool",
    ("conv4_1", 17, 256, 512), ("conv4_2", 19, 512, 512), ("conv4_3", 21, 512, 512), "pool",
    ("conv5_1", 24, 512, 512), ("conv5_2", 26, 512, 512), ("conv5_3", 28, 512, 512),
)
TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")  # relu of these is what LPIPS compares
TAP_CHANNELS = (64, 128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    """Constructor arguments of `LPIPS` (stored in weights directories)."""

    dropout_rate: float = 0.5  # the reference's Dropout before each lin head (used only with a dropout_key)


class FrozenConv(nnx.Module):
    """3x3 conv, stride 1, padding 1 (torchvision VGG), with Frozen kernel (HWIO) and bias."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        # torchvision's VGG init: kaiming_normal(fan_out, relu), bias 0.
        std = (2.0 / (out_ch * 9)) ** 0.5
        self.kernel = Frozen(std * jax.random.normal(rngs.params(), (3, 3, in_ch, out_ch), jnp.float32))
        self.bias = Frozen(jnp.zeros((out_ch,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...]


class VGG16Features(nnx.Module):
    """torchvision VGG16 `features[:30]`; returns the five relu taps."""

    def __init__(self, *, rngs: nnx.Rngs):
        for layer in VGG16_LAYERS:
            if layer != "pool":
                name, _, cin, cout = layer
                setattr(self, name, FrozenConv(cin, cout, rngs=rngs))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for layer in VGG16_LAYERS:
            if layer == "pool":  # MaxPool2d(2, 2): floor on odd sizes, like VALID
                x = max_pool_2x2(x)
                continue
            name = layer[0]
            x = jax.nn.relu(getattr(self, name)(x))
            if name in TAPS:
                taps.append(x)
        return taps


class LinHead(nnx.Module):
    """lpips `NetLinLayer`: [dropout] + 1x1 conv to one channel without bias; kernel HWIO (1, 1, C, 1)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        # The shipped heads are non-negative (mean ~0.1); a random head keeps that so distances stay >= 0.
        self.kernel = Frozen(jax.random.uniform(rngs.params(), (1, 1, channels, 1), jnp.float32, 0.0, 0.2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("bhwc,co->bhwo", x, self.kernel[0, 0])


def normalize_channels(x: jax.Array, eps: float = EPS) -> jax.Array:
    """x / (||x||_channels + eps), as lpips.normalize_tensor.

    The sqrt is taken of max(sum, 1e-30) so its gradient stays finite where a feature vector is all zero; that
    moves the denominator by at most 1e-15 next to eps = 1e-10 (and then the numerator is 0 anyway).
    """
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))
    return x / (norm + eps)


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """torch.nn.Dropout in training mode: zero each element with probability `rate`, scale the rest by
    1/(1-rate) so the expectation is unchanged."""
    if rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class LPIPS(nnx.Module):
    """VGG LPIPS; `__call__(x, y, dropout_key=None) -> (batch,)` distances for NHWC images in [-1, 1]."""

    def __init__(self, dropout_rate: float = 0.5, *, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        self.net = VGG16Features(rngs=rngs)
        for i, ch in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{i}", LinHead(ch, rngs=rngs))

    @property
    def config(self) -> LPIPSConfig:
        return LPIPSConfig(dropout_rate=self.dropout_rate)

    def __call__(self, x: jax.Array, y: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Distance per image, shape (batch,). Dropout (rate `dropout_rate`, kept values scaled by 1/(1-rate))
        is applied before every lin head iff `dropout_key` is given."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two NHWC RGB batches of one shape, got {x.shape}, {y.shape}.")
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        n = x.shape[0]
        # Two passes of the VGG, not one on the concatenated batch: a loss back-propagates into one side only (the
        # reconstruction), and a batch-2n pass would carry its backward convolutions through both.
        feats_x, feats_y = self.net((x - shift) / scale), self.net((y - shift) / scale)
        keys = jax.random.split(dropout_key, len(feats_x)) if dropout_key is not None else [None] * len(feats_x)
        total = jnp.zeros((n,), jnp.float32)
        for i, (fx, fy, key) in enumerate(zip(feats_x, feats_y, keys, strict=True)):
            diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2
            if key is not None:
                diff = dropout(diff, key, self.dropout_rate)
            total = total + jnp.mean(getattr(self, f"lin{i}")(diff), axis=(1, 2, 3))
        return total


def random_variables(config: LPIPSConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for tests, needing no file: VGG N(0, 2/fan_out), heads U(0, 0.2), biases 0.

    Same distributions as `LPIPS(rngs=...)`, drawn with numpy into an abstract model: no XLA compilation,
    so it takes well under a second instead of one compile per weight shape.
    """
    gen = np.random.default_rng(seed)
    flat = {}
    for layer in VGG16_LAYERS:
        if layer != "pool":
            name, _, cin, cout = layer
            std = (2.0 / (cout * 9)) ** 0.5
            flat[f"net/{name}/kernel"] = std * gen.standard_normal((3, 3, cin, cout), np.float32)
            flat[f"net/{name}/bias"] = np.zeros((cout,), np.float32)
    for i, ch in enumerate(TAP_CHANNELS):
        flat[f"lin{i}/kernel"] = gen.uniform(0.0, 0.2, (1, 1, ch, 1)).astype(np.float32)
    return flat


# build(config=None, *, seed=0) (`random_variables`), abstract(config=None), load(path, **overrides),
# save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, LPIPSConfig, lambda config, rngs: LPIPS(config.dropout_rate, rngs=rngs), random_variables=random_variables)
