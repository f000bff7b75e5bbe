"""2x2 stride-2 max-pooling (torch's `MaxPool2d(2, 2)`) whose gradient on CPU is a mask, not a scatter.

Why: XLA:CPU (jaxlib 0.10.2) runs the gradient of `lax.reduce_window(max)` as a select-and-scatter: 126 ms for
a (1, 256, 256, 64) input against 5 ms for the compares below, 80 vs 1.5 ms at (1, 128, 128, 128) (2 loaded
cores). LPIPS-VGG16 pools four times and the EQ-VAE generator step takes its gradient twice.

The forward is `reduce_window` on every platform. The backward sends each output gradient to the first maximum
of its window in row-major order, as select-and-scatter and torch's max-pool backward do (ties matter: after
a ReLU a window is often all zeros), as elementwise compares on the four strided views of x. Only the CPU
lowering uses it (`lax.platform_dependent`); TPU and GPU programs keep XLA's select-and-scatter. Odd sizes
floor like torch's pool (VALID); the last row/column gets no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_WINDOW = (1, 2, 2, 1)


def _reduce_window(x: jax.Array) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, _WINDOW, _WINDOW, "VALID")


def _mask_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """d pool / d x by compares: each window's first maximum (row-major) gets dy, the rest zero."""
    b, h, w, c = x.shape
    h2, w2 = dy.shape[1], dy.shape[2]
    x6 = x[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c)
    y = x6.max(axis=(2, 4))
    taken = jnp.zeros(dy.shape, bool)
    rows = []
    for i in range(2):
        cols = []
        for j in range(2):
            hit = (x6[:, :, i, :, j] == y) & ~taken
            taken = taken | hit
            cols.append(jnp.where(hit, dy, jnp.zeros_like(dy)))
        rows.append(jnp.stack(cols, axis=3))  # (b, h2, w2, 2, c)
    dx = jnp.stack(rows, axis=2).reshape(b, 2 * h2, 2 * w2, c)
    return jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """NHWC 2x2 max-pool, stride 2, VALID (module docstring)."""
    return _reduce_window(x)


def _fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _reduce_window(x), x


def _bwd(x: jax.Array, dy: jax.Array) -> tuple[jax.Array]:
    def xla_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
        return jax.vjp(_reduce_window, x)[1](dy)[0]

    return (lax.platform_dependent(x, dy, cpu=_mask_grad, default=xla_grad),)


max_pool_2x2.defvjp(_fwd, _bwd)
