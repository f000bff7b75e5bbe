"""A 2-D convolution whose kernel gradient runs as one matmul per kernel tap on CPU.

Why: XLA:CPU (jaxlib 0.10.2) computes a conv's kernel gradient as a convolution whose window is the whole
image (`window={size=256x256}` in the HLO). That program runs at 35-80 GFLOP/s on a 2-core AVX-512 machine,
2-3x below the forward conv of the same FLOPs, and was 45% of the SD-VAE generator step at 256 px
(`python -m benchmarks.step_breakdown --profile DIR`). Written as a sum over the kernel's taps,
dW[i, j]^T = dy^T @ x_shifted(i, j) with dy transposed once per conv, the same FLOPs run as row-major matmuls
that XLA:CPU hands to YNNPACK, at about the forward conv's speed (docs/cpu_speed.md).

Only the CPU lowering changes (`lax.platform_dependent`): a program lowered for TPU or GPU gets XLA's own
gradient, so TPU programs keep their FLOPs and memory. The forward and the input gradient are XLA's in
every case. Shapes outside the fast path (dilation, feature groups, other layouts or dtypes) fall back to
`lax.conv_general_dilated` unchanged. The result differs from XLA's by float32 summation order only.

Used as `nnx.Conv(..., conv_general_dilated=conv_grad.conv_general_dilated)`: parameters and checkpoints
are those of a plain `nnx.Conv`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any) -> jax.Array:
    """XLA's own NHWC x HWIO conv (forward and autodiff): the plain convolution this module's kernel gradient
    replaces on CPU; `upsample_conv` builds on it too."""
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


# Rows of one tap matmul at most: YNNPACK's NN dot ran at 140-185 GFLOP/s up to 2^16 rows and at 95-135 beyond
# (docs/cpu_speed.md); a larger batch runs as several matmuls per tap, summed.
MAX_ROWS_PER_DOT = 1 << 16
# Below this many input channels the (cout, K) @ (K, cin) matmul is too narrow for YNNPACK to beat XLA's own dot
# on x_shifted^T @ dy (3 -> 64 ch: 0.46x, 32 -> 128 ch: 0.88x; 64 -> 128 ch: 1.51x; docs/cpu_speed.md).
MIN_CIN_FOR_NN = 64


def kernel_grad_by_taps(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], strides: tuple[int, int],
                        pads: Pads, precision: Any = None) -> jax.Array:
    """d loss / d kernel of an NHWC x HWIO conv from its input `x` and output gradient `dy`: one matmul per tap.

    dW[i, j]^T = dy^T @ x_shifted(i, j): dy is transposed once, so each tap's matmul contracts over the pixels
    of both operands in the row-major (NN) form that XLA:CPU sends to YNNPACK; the transposed-left form
    x_shifted^T @ dy runs in XLA's own dot at 0.8x that speed. The taps run in a loop (`lax.map`), so one
    shifted copy of x exists at a time: unrolled, XLA:CPU schedules the copies of many convs at once (+6 GiB
    temporaries in the SD-VAE step at 256 px).
    """
    kh, kw, cin, cout = kernel_shape
    b, oh, ow, _ = dy.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    group = _batch_group(b, oh * ow)
    chunks, rows = b // group, group * oh * ow
    span = (group, sh * (oh - 1) + 1, sw * (ow - 1) + 1, cin)
    taps = kh * kw
    nn = cin >= MIN_CIN_FOR_NN
    dy_chunks = dy.reshape(chunks, rows, cout)
    if nn:
        dy_chunks = dy_chunks.transpose(0, 2, 1)  # (chunks, cout, rows), once for all taps

    def tap(index: jax.Array) -> jax.Array:
        t, c = index // chunks, index % chunks
        window = lax.dynamic_slice(xp, (c * group, t // kw, t % kw, 0), span)[:, ::sh, ::sw, :]
        window = window.reshape(rows, cin)
        if nn:
            return jnp.dot(dy_chunks[c], window, precision=precision)  # (cout, cin)
        return jnp.dot(window.T, dy_chunks[c], precision=precision)  # (cin, cout)

    if taps * chunks == 1:
        per_tap = tap(jnp.int32(0))[None, None]
    else:
        per_tap = lax.map(tap, jnp.arange(taps * chunks, dtype=jnp.int32))
        per_tap = per_tap.reshape(taps, chunks, *per_tap.shape[1:])
    per_tap = per_tap.sum(axis=1) if chunks > 1 else per_tap[:, 0]
    if nn:
        per_tap = per_tap.transpose(0, 2, 1)
    return per_tap.reshape(kernel_shape)


def _batch_group(batch: int, pixels: int) -> int:
    """The most images whose rows fit one tap matmul (MAX_ROWS_PER_DOT), a divisor of the batch; at least 1."""
    group = max(1, min(batch, MAX_ROWS_PER_DOT // pixels))
    while batch % group:
        group -= 1
    return group


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_tap_grad(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any) -> jax.Array:
    """NHWC x HWIO conv; its kernel gradient by taps on CPU (module docstring)."""
    return conv_nhwc(x, w, strides, pads, precision)


def _fwd(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
         precision: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # conv_tap_grad, not conv_nhwc: when this forward is itself differentiated (the gradient of a function that
    # takes a VJP, as the adaptive weight's last-layer VJP inside the generator loss does), its kernel gradient
    # is the tap matmuls too. Undifferentiated it is the same convolution.
    return conv_tap_grad(x, w, strides, pads, precision), (x, w)


def _bwd(strides: tuple[int, int], pads: Pads, precision: Any, res: tuple[jax.Array, jax.Array],
         dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = jax.vjp(lambda x: conv_nhwc(x, w, strides, pads, precision), x)[1](dy)[0]

    def xla_grad(x: jax.Array, w: jax.Array, dy: jax.Array) -> jax.Array:
        return jax.vjp(lambda w: conv_nhwc(x, w, strides, pads, precision), w)[1](dy)[0]

    def tap_grad(x: jax.Array, w: jax.Array, dy: jax.Array) -> jax.Array:
        return kernel_grad_by_taps(x, dy, w.shape, strides, pads, precision)

    dw = lax.platform_dependent(x, w, dy, cpu=tap_grad, default=xla_grad)
    return dx, dw


conv_tap_grad.defvjp(_fwd, _bwd)


def _explicit_pads(padding: str | Sequence[tuple[int, int]], x: jax.Array, w: jax.Array,
                   strides: tuple[int, int]) -> Pads | None:
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return pads if len(pads) == 2 and all(p >= 0 for pair in pads for p in pair) else None  # type: ignore[return-value]


def _is_nhwc(dimension_numbers: Any, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False
    if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
        return tuple(dimension_numbers) == _NHWC
    expected = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, expected))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (the signature nnx.Conv calls): the tap-gradient conv where it
    applies (2-D NHWC/HWIO, float32, no dilation or groups), else lax's own."""
    strides = tuple(int(s) for s in window_strides)
    plain = (
        _is_nhwc(dimension_numbers, lhs.ndim)
        and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
        and kwargs.get("out_sharding") is None and len(strides) == 2
    )
    pads = _explicit_pads(padding, lhs, rhs, strides) if plain else None  # type: ignore[arg-type]
    if pads is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type, **kwargs)
    return conv_tap_grad(lhs, rhs, strides, pads, precision)
