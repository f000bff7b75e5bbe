"""Nearest-neighbour x2 upsampling followed by a 3x3 conv, computed on CPU as four 2x2 convs of the small input.

Why: the decoder's `Upsample` (LDM `Upsample(with_conv=True)`) repeats every pixel 2x2 and then runs a 3x3 conv
at the doubled size. Each output pixel then sees only a 2x2 neighbourhood of the small input, with some of the
nine kernel taps landing on the same input pixel: output phase 0 of a row reads input rows (h-1, h) with kernel
rows (w0, w1 + w2), phase 1 reads rows (h, h+1) with (w0 + w1, w2), and likewise for columns. So the same
output is four 2x2 convs of the small input with folded kernels: 4/9 of the FLOPs, and no 4x-sized repeated
tensor. On XLA:CPU (jaxlib 0.10.2) the reference form was also slow for a second reason: the input gradient of
the conv after `repeat` fuses with the 2x2 sum of the repeat's transpose into one library call at 2.3x the
conv's own time (0.96 s per SD-VAE G step at 256 px, `benchmarks/step_breakdown.py --profile`).

The forward is one 2x2 conv with four times the output channels (one per phase, then interleaved); the
backward takes the input gradient as four phase-wise convs (the single wide conv's input gradient ran 3x its
forward's time) and the kernel gradient as `conv_grad`'s tap matmuls of the single conv, folded back to 3x3.
Only the CPU lowering uses it (`lax.platform_dependent`, as `conv_grad` and `max_pool`); TPU and GPU programs
run the reference repeat + 3x3 conv. Values differ from the reference by float32 summation order only (the
folded taps are added before they multiply).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from eqvae_jax.models import conv_grad

_SAME = ((1, 1), (1, 1))
_UNIT = (1, 1)  # strides


def _fold_axis(w: jax.Array, axis: int) -> jax.Array:
    """Three taps along `axis` -> (phase, two taps): phase 0 (w0, w1 + w2), phase 1 (w0 + w1, w2); phase first."""
    w0, w1, w2 = (lax.index_in_dim(w, i, axis, keepdims=False) for i in range(3))
    return jnp.stack([jnp.stack([w0, w1 + w2], axis), jnp.stack([w0 + w1, w2], axis)])


def fold_kernel(w: jax.Array) -> jax.Array:
    """A (3, 3, C, D) kernel applied after nearest x2 -> (2, 2, C, 4D) phase kernels: channel (a * 2 + b) * D + d
    is output row phase a, column phase b, channel d, over the small input padded by one on every side."""
    c, d = w.shape[2], w.shape[3]
    k = _fold_axis(_fold_axis(w, 0), 2)  # (col phase b, row phase a, 2, 2, C, D)
    return jnp.transpose(k, (2, 3, 4, 1, 0, 5)).reshape(2, 2, c, 4 * d)


def _interleave(y: jax.Array, h: int, w: int) -> jax.Array:
    """(B, H + 1, W + 1, 4D) phase outputs -> (B, 2H, 2W, D): phase (a, b) at (h, w) is y[h + a, w + b]."""
    b, d = y.shape[0], y.shape[-1] // 4
    y = y.reshape(b, h + 1, w + 1, 2, 2, d)
    rows = [jnp.stack([y[:, a:a + h, p:p + w, a, p] for p in (0, 1)], 3) for a in (0, 1)]
    return jnp.stack(rows, 2).reshape(b, 2 * h, 2 * w, d)


def _phases(dy: jax.Array) -> list[list[jax.Array]]:
    """(B, 2H, 2W, D) -> [a][b] (B, H, W, D): the output pixels of row phase a and column phase b."""
    b, h2, w2, d = dy.shape
    dy6 = dy.reshape(b, h2 // 2, 2, w2 // 2, 2, d)
    return [[dy6[:, :, a, :, p] for p in (0, 1)] for a in (0, 1)]


def _reference(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    return conv_grad.conv_nhwc(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w, _UNIT, _SAME, precision)


def _subpixel(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    return _interleave(conv_grad.conv_nhwc(x, fold_kernel(w), _UNIT, _SAME, precision), x.shape[1], x.shape[2])


def _subpixel_grads(x: jax.Array, w: jax.Array, dy: jax.Array, precision: Any) -> tuple[jax.Array, jax.Array]:
    """(dx, dw) of `_subpixel`: dx by four phase convs' input gradients, dw by tap matmuls of the wide conv."""
    k, fold_vjp = jax.vjp(fold_kernel, w)
    d = w.shape[3]
    k6 = k.reshape(2, 2, w.shape[2], 2, 2, d)
    phases = _phases(dy)
    dx = jnp.zeros_like(x)
    for a in (0, 1):
        for p in (0, 1):
            phase_conv = functools.partial(conv_grad.conv_nhwc, w=k6[:, :, :, a, p], strides=_UNIT,
                                           pads=((1 - a, a), (1 - p, p)), precision=precision)
            dx = dx + jax.vjp(phase_conv, x)[1](phases[a][p])[0]
    b, h, wd, _ = x.shape
    wide = jax.ShapeDtypeStruct((b, h + 1, wd + 1, 4 * d), dy.dtype)
    (dy_wide,) = jax.linear_transpose(lambda y: _interleave(y, h, wd), wide)(dy)  # pads, not a scatter
    dk = conv_grad.kernel_grad_by_taps(x, dy_wide, k.shape, _UNIT, _SAME, precision)
    return dx, fold_vjp(dk)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def nearest2x_conv3x3(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
    """conv3x3(nearest_upsample_x2(x), w) with padding 1, NHWC x HWIO, no bias (module docstring)."""
    return lax.platform_dependent(x, w, cpu=functools.partial(_subpixel, precision=precision),
                                  default=functools.partial(_reference, precision=precision))


def _fwd(x: jax.Array, w: jax.Array, precision: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return nearest2x_conv3x3(x, w, precision), (x, w)


def _reference_grads(x: jax.Array, w: jax.Array, dy: jax.Array, precision: Any) -> tuple[jax.Array, jax.Array]:
    """(dx, dw) of `_reference` by XLA's autodiff: what TPU and GPU programs run."""
    return jax.vjp(lambda x, w: _reference(x, w, precision), x, w)[1](dy)


def _bwd(precision: Any, res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return lax.platform_dependent(x, w, dy, cpu=functools.partial(_subpixel_grads, precision=precision),
                                  default=functools.partial(_reference_grads, precision=precision))


nearest2x_conv3x3.defvjp(_fwd, _bwd)
