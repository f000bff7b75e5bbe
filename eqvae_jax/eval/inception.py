"""The FID InceptionV3 (TF `inception-2015-12-05`, as ported to PyTorch by pytorch-fid / torch-fidelity) in NNX.

    from eqvae_jax.eval import inception
    net = inception.load(path)          # weights dir from `python -m eqvae_jax.convert --kind inception`
    f = net(images)                     # uint8 (B, H, W, 3), any H, W
    f["pool"]             # (B, 2048)  pool_3: FID, precision/recall
    f["logits_unbiased"]  # (B, 1008)  pool_3 @ softmax weights, no bias: the Inception Score
    f["spatial"]          # (B, 2023)  mixed_6/conv[..., :7] flattened HWC (17*17*7): sFID

This is the network behind the ADM evaluator's TF graph (`classify_image_graph_def.pb`) fed at `ExpandDims:0`:
- the input (uint8 values as float32) is resized to 299x299 by TF1's `ResizeBilinear` (align_corners=False,
  no half-pixel centres: source coordinate = dst * in/out, corners of the 2x2 neighbourhood clamped at the
  border, horizontal then vertical interpolation as `a + (b - a) * frac`), then scaled to (x - 128) / 128
  (`preprocess='adm'`, the default: ADM's evaluator, torch-fidelity). `preprocess='pytorch_fid'` is
  pytorch-fid's `InceptionV3.forward` instead (zelaki/eqvae's rFID): x / 255 (torchvision `ToTensor`),
  `F.interpolate(size=299, mode='bilinear', align_corners=False)` (half-pixel centres, no antialias), 2 x - 1;
  the same weights;
- every conv is `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3, running statistics), ReLU;
- the 3x3 average pools inside Mixed_5b-d, 6b-e and 7b divide by the number of non-padded inputs
  (TF's average pool; PyTorch's count_include_pad=False); Mixed_7c's pool branch is a 3x3 *max* pool (a quirk
  of this TF graph that the FID network keeps);
- pool_3 is the global average of Mixed_7c (2048); `softmax/logits` is a 2048 -> 1008 linear layer.

Which tensor ADM's sFID uses: ADM fetches `mixed_6/conv:0` and keeps `[..., :7]`. The TF graph numbers its
Inception blocks mixed, mixed_1, ... mixed_10 = torch Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c (the
TF -> PyTorch weight map of torch-fidelity's converter maps `mixed_6/conv/conv2d_params` to
`Mixed_6d.branch1x1.conv`), and the op named `mixed_6/conv` is that layer's ReLU (its conv and batchnorm ops
are `mixed_6/conv/Conv2D` and `mixed_6/conv/batchnorm`). So `spatial` is the ReLU output of
`Mixed_6d.branch1x1` (17x17x192, channels in the weights' order), its first 7 channels, flattened in NHWC
order like ADM's `reshape([N, -1])` of the TF tensor.

Module and variable names follow the PyTorch state dict (`Mixed_6d/branch1x1/conv/kernel` is
`Mixed_6d.branch1x1.conv.weight`; BatchNorm `scale/bias/mean/var` are `weight/bias/running_mean/running_var`).
All weights are `Frozen` (never `nnx.Param`). Calling the module outside a trace runs one jitted program
(compiled once per input shape); inside `jax.jit` it is traced like any module. Convs and the fc layer use
`precision` ("highest": float32 accuracy on TPU, which ADM-comparable numbers need; "default" is the
backend's fast mode, one bf16 pass on TPU).

`InceptionConfig(width_divisor=16, image_size=75)` (`tiny()`) is the same architecture with every channel
count divided and a smaller input resize, for fast tests of the evaluation pipeline only: its features are
(B, 128), (B, 1008), (B, 3*3*7).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.variables import Frozen
from eqvae_jax.typed_config import from_section

KIND = "inception"
BN_EPS = 1e-3
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
PRECISIONS = ("highest", "high", "default")
PREPROCESSES = ("adm", "pytorch_fid")  # input resize + scaling before the network (module docstring)


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Constructor arguments of `InceptionV3` (JSON round-trippable). The defaults are the FID network."""

    width_divisor: int = 1  # every channel count // this (1 = the FID network; >1 only for tests)
    image_size: int = 299  # the TF1 bilinear resize target
    precision: str = "highest"  # jax.lax.Precision of convs and the fc matmul
    # 'adm': TF1 bilinear resize, (x - 128) / 128 (ADM's evaluator, torch-fidelity); 'pytorch_fid': x / 255,
    # torch bilinear resize with half-pixel centres, 2 x - 1 (pytorch-fid, zelaki/eqvae's rFID). Same weights.
    preprocess: str = "adm"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"InceptionConfig: precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.preprocess not in PREPROCESSES:
            raise ValueError(f"InceptionConfig: preprocess must be one of {PREPROCESSES}, got {self.preprocess!r}.")
        if not 1 <= self.width_divisor <= 192 // SPATIAL_CHANNELS:
            raise ValueError(f"InceptionConfig: width_divisor must be in [1, {192 // SPATIAL_CHANNELS}] so that "
                             f"Mixed_6d.branch1x1 keeps >= {SPATIAL_CHANNELS} channels, got {self.width_divisor}.")
        if self.image_size < 75:
            raise ValueError(f"InceptionConfig: image_size must be >= 75 (Mixed_7a needs 3x3), got {self.image_size}.")

    @property
    def pool_features(self) -> int:
        return 2048 // self.width_divisor

    @property
    def spatial_size(self) -> int:
        """Side of the 17x17 map at image_size 299 (Mixed_6*): three stride-2 VALID 3x3 reductions."""
        s = (self.image_size - 3) // 2 + 1  # Conv2d_1a_3x3
        s = s - 2  # Conv2d_2a_3x3
        s = (s - 3) // 2 + 1  # MaxPool_1
        s = s - 2  # Conv2d_4a_3x3
        s = (s - 3) // 2 + 1  # MaxPool_2
        return (s - 3) // 2 + 1  # Mixed_6a

    @property
    def spatial_features(self) -> int:
        return self.spatial_size**2 * SPATIAL_CHANNELS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InceptionConfig:
        return from_section(cls, d)


def fid(**overrides: Any) -> InceptionConfig:
    """The FID / ADM-evaluator network (pt_inception-2015-12-05)."""
    return dataclasses.replace(InceptionConfig(), **overrides)


def tiny(**overrides: Any) -> InceptionConfig:
    """Channels / 16, 75x75 resize: the same code path at a fraction of the cost (tests of the pipeline)."""
    return dataclasses.replace(InceptionConfig(width_divisor=16, image_size=75), **overrides)


PRESETS = {"fid": fid, "tiny": tiny}


# --------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------


def tf1_resize_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) of TF1 ResizeBilinear with align_corners=False for one axis, in float32 arithmetic.

    source = float32(dst) * float32(in/out); lo = floor(source); hi = min(lo + 1, in - 1); frac = source - lo.
    """
    scale = np.float32(in_size / out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = src.astype(np.int64)  # truncation == floor for src >= 0
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_bilinear_tf1(x: jax.Array, size: int) -> jax.Array:
    """TF1 `tf.image.resize_bilinear(x, (size, size), align_corners=False)` of a float32 NHWC batch."""
    _, h, w, _ = x.shape
    if (h, w) == (size, size):
        return x
    ylo, yhi, dy = tf1_resize_indices(h, size)
    xlo, xhi, dx = tf1_resize_indices(w, size)
    top, bottom = jnp.take(x, ylo, axis=1), jnp.take(x, yhi, axis=1)
    dx = jnp.asarray(dx)[None, None, :, None]
    row0 = jnp.take(top, xlo, axis=2)
    row0 = row0 + (jnp.take(top, xhi, axis=2) - row0) * dx
    row1 = jnp.take(bottom, xlo, axis=2)
    row1 = row1 + (jnp.take(bottom, xhi, axis=2) - row1) * dx
    return row0 + (row1 - row0) * jnp.asarray(dy)[None, :, None, None]


def preprocess_adm(images: jax.Array, size: int) -> jax.Array:
    """ADM's evaluator input: TF1 bilinear resize of the 0..255 values to size x size, then (x - 128) / 128."""
    return (resize_bilinear_tf1(images.astype(jnp.float32), size) - 128.0) / 128.0


def preprocess_pytorch_fid(images: jax.Array, size: int) -> jax.Array:
    """pytorch-fid's input: x / 255, `F.interpolate(size=(size, size), mode='bilinear', align_corners=False)`
    (half-pixel centres, no antialias, also when shrinking), then 2 x - 1."""
    x = images.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="linear", antialias=False)
    return 2.0 * x - 1.0


PREPROCESS = {"adm": preprocess_adm, "pytorch_fid": preprocess_pytorch_fid}


def _pairs(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool; padded positions are -inf (never selected), like PyTorch's MaxPool2d."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average that divides by the count of real (non-padded) inputs (TF's avg pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    h, w = x.shape[1:3]
    count_h = np.minimum(np.arange(h) + 2, h) - np.maximum(np.arange(h) - 1, 0)
    count_w = np.minimum(np.arange(w) + 2, w) - np.maximum(np.arange(w) - 1, 0)
    count = np.outer(count_h, count_w).astype(np.float32)
    return total / jnp.asarray(count)[None, :, :, None]


class BatchNorm(nnx.Module):
    """Inference BatchNorm with Frozen running statistics: (x - mean) / sqrt(var + 1e-3) * scale + bias."""

    def __init__(self, channels: int):
        self.scale = Frozen(jnp.ones((channels,), jnp.float32))
        self.bias = Frozen(jnp.zeros((channels,), jnp.float32))
        self.mean = Frozen(jnp.zeros((channels,), jnp.float32))
        self.var = Frozen(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return x * inv + (self.bias[...] - self.mean[...] * inv)


class Conv(nnx.Module):
    """Conv without bias, Frozen HWIO kernel, symmetric zero padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], stride: int, padding,
                 precision: str):
        kh, kw = _pairs(kernel)
        self.kernel = Frozen(jnp.zeros((kh, kw, in_ch, out_ch), jnp.float32))
        self.stride = stride
        self.padding = _pairs(padding)
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        return jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision(self.precision),
        )


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, precision: str = "highest"):
        self.conv = Conv(in_ch, out_ch, kernel, stride, padding, precision)
        self.bn = BatchNorm(out_ch)
        self.out_channels = out_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class _Block(nnx.Module):
    """Shared constructor helper: `self.c(n)` is a channel count scaled by the width divisor."""

    def _setup(self, divisor: int, precision: str) -> None:
        self._divisor = divisor
        self._precision = precision

    def c(self, n: int) -> int:
        return n // self._divisor

    def conv(self, in_ch: int, out_ch: int, kernel, **kw: Any) -> BasicConv2d:
        return BasicConv2d(in_ch, out_ch, kernel, precision=self._precision, **kw)


class InceptionA(_Block):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, in_ch: int, pool_features: int, divisor: int, precision: str):
        self._setup(divisor, precision)
        c = self.c
        self.branch1x1 = self.conv(in_ch, c(64), 1)
        self.branch5x5_1 = self.conv(in_ch, c(48), 1)
        self.branch5x5_2 = self.conv(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = self.conv(in_ch, c(64), 1)
        self.branch3x3dbl_2 = self.conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = self.conv(c(96), c(96), 3, padding=1)
        self.branch_pool = self.conv(in_ch, c(pool_features), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, in_ch: int, divisor: int, precision: str):
        self._setup(divisor, precision)
        c = self.c
        self.branch3x3 = self.conv(in_ch, c(384), 3, stride=2)
        self.branch3x3dbl_1 = self.conv(in_ch, c(64), 1)
        self.branch3x3dbl_2 = self.conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = self.conv(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + in_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
    """17x17 block (Mixed_6b-e): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1."""

    def __init__(self, in_ch: int, channels_7x7: int, divisor: int, precision: str):
        self._setup(divisor, precision)
        c, c7 = self.c, self.c(channels_7x7)
        self.branch1x1 = self.conv(in_ch, c(192), 1)
        self.branch7x7_1 = self.conv(in_ch, c7, 1)
        self.branch7x7_2 = self.conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = self.conv(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = self.conv(in_ch, c7, 1)
        self.branch7x7dbl_2 = self.conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = self.conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = self.conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = self.conv(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = self.conv(in_ch, c(192), 1)
        self.out_channels = 4 * c(192)

    def with_branch1x1(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(block output, the ReLU output of branch1x1) — the latter is TF's `mixed_N/conv`."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.with_branch1x1(x)[0]


class InceptionD(_Block):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, in_ch: int, divisor: int, precision: str):
        self._setup(divisor, precision)
        c = self.c
        self.branch3x3_1 = self.conv(in_ch, c(192), 1)
        self.branch3x3_2 = self.conv(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = self.conv(in_ch, c(192), 1)
        self.branch7x7x3_2 = self.conv(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = self.conv(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = self.conv(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + in_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
    """8x8 block (Mixed_7b: avg pool branch; Mixed_7c: max pool branch, the FID graph's quirk)."""

    def __init__(self, in_ch: int, max_pool_branch: bool, divisor: int, precision: str):
        self._setup(divisor, precision)
        c = self.c
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = self.conv(in_ch, c(320), 1)
        self.branch3x3_1 = self.conv(in_ch, c(384), 1)
        self.branch3x3_2a = self.conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = self.conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = self.conv(in_ch, c(448), 1)
        self.branch3x3dbl_2 = self.conv(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = self.conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = self.conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = self.conv(in_ch, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID InceptionV3; `net(images) -> {'pool', 'logits_unbiased', 'spatial'}` (module docstring)."""

    def __init__(self, config: InceptionConfig | None = None):
        config = config or InceptionConfig()
        self.config = config
        d, p = config.width_divisor, config.precision

        def c(n: int) -> int:
            return n // d

        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2, precision=p)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3, precision=p)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1, precision=p)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1, precision=p)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3, precision=p)
        self.Mixed_5b = InceptionA(c(192), 32, d, p)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, d, p)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, d, p)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, d, p)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, d, p)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, d, p)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, d, p)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, d, p)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, d, p)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, False, d, p)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, True, d, p)
        if self.Mixed_7c.out_channels != config.pool_features:
            raise AssertionError("InceptionV3: channel bookkeeping is off (a bug)")
        self.fc = _Linear(config.pool_features, NUM_CLASSES, p)

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """The traced forward pass (see the module docstring); float32 outputs."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception expects NHWC RGB images (B, H, W, 3), got shape {images.shape}.")
        if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
            raise ValueError(f"Inception expects uint8 images (or floats on the 0..255 scale), got {images.dtype}.")
        x = PREPROCESS[self.config.preprocess](images, self.config.image_size)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, mixed_6_conv = self.Mixed_6d.with_branch1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = jnp.mean(x, axis=(1, 2))
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(images.shape[0], -1)
        return {"pool": pool, "logits_unbiased": self.fc(pool), "spatial": spatial}

    def __call__(self, images: jax.Array | np.ndarray) -> dict[str, jax.Array]:
        """Features of an image batch; outside a trace this runs one cached jitted program."""
        if isinstance(images, jax.core.Tracer) or any(
            isinstance(v.get_value(), jax.core.Tracer) for _, v in nnx.to_flat_state(nnx.state(self))
        ):
            return self.features(images)
        graphdef, state = nnx.split(self)
        return _jitted_features(graphdef, state, jnp.asarray(images))


class _Linear(nnx.Module):
    """The 2048 -> 1008 `softmax/logits` matmul without its bias (ADM's IS uses the unbiased logits)."""

    def __init__(self, in_features: int, out_features: int, precision: str):
        self.kernel = Frozen(jnp.zeros((in_features, out_features), jnp.float32))
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.matmul(x, self.kernel[...], precision=jax.lax.Precision(self.precision))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    return nnx.merge(graphdef, state).features(images)


# --------------------------------------------------------------------------------------------------------
# build / abstract / load / save
# --------------------------------------------------------------------------------------------------------


def random_variables(config: InceptionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random flat variables drawn on the host with numpy (milliseconds, no XLA compile).

    Kernels N(0, 2/fan_in) (He, so activations keep their scale through the depth); BatchNorm scale U(0.8, 1.2),
    bias N(0, 0.1), running mean N(0, 0.1), running var U(0.5, 1.5); fc N(0, 1/fan_in). Random weights are for
    tests: their features have the right shapes but mean nothing.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in sorted(weights.variable_shapes(abstract(config)).items()):
        leaf = key.rsplit("/", 1)[1]
        if key == "fc/kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        elif leaf == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif leaf == "scale":
            value = rng.uniform(0.8, 1.2, shape)
        elif leaf in ("bias", "mean"):
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # pragma: no cover - a new variable without an init rule
            raise ValueError(f"build: no init rule for {key}")
        flat[key] = value.astype(np.float32)
    return flat


# build(config=None, *, seed=0) (`random_variables`), abstract(config=None) (None: the FID network),
# load(path, **overrides) (fields that keep the weights' shapes, e.g. precision="default"), save(model, path):
# see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, InceptionConfig, lambda config, rngs: InceptionV3(config), random_variables=random_variables)
