"""The two geometric transforms of EQ-VAE, bit-for-bit the PyTorch reference's, on NHWC arrays.

- `resize(x, num, den)`: `F.interpolate(x, scale_factor=num/den, mode='bilinear', align_corners=False)`, no
  antialias. Output size is floor(size * num / den) and the sampling grid uses the *given* scale (PyTorch's
  behaviour when `recompute_scale_factor` is unset), so it also matches when size * num / den is not an integer.
  When it is an integer this is exactly `jax.image.resize(method='linear', antialias=False)`.
- `rot90(x, k)`: `torch.rot90(x, k, dims=[-1, -2])` on NCHW == `jnp.rot90(x, k, axes=(2, 1))` on NHWC.
- `rot90_traced(x, k, parity)`: the same with a traced k (`lax.switch`). When the rotated shape differs from the
  unrotated one (non-square), the caller fixes k's parity statically and only same-shape rotations are switched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROT_AXES = (2, 1)  # NHWC axes for torch.rot90(dims=[-1, -2]) on NCHW


def resized_size(size: int, num: int, den: int) -> int:
    """floor(size * num / den), PyTorch's output size for `scale_factor=num/den` (exact integer arithmetic)."""
    return (size * num) // den


def resize(x: jax.Array, num: tuple[int, int], den: int) -> jax.Array:
    """Bilinear, align_corners=False, no antialias; H scaled by num[0]/den and W by num[1]/den (NHWC)."""
    if num[0] == den and num[1] == den:
        return x
    b, h, w, c = x.shape
    shape = (b, resized_size(h, num[0], den), resized_size(w, num[1], den), c)
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"resize of {x.shape} by {num}/{den} gives an empty image {shape}.")
    scale = jnp.asarray([num[0] / den, num[1] / den], jnp.float32)
    return jax.image.scale_and_translate(
        x, shape, (1, 2), scale, jnp.zeros((2,), jnp.float32), method="linear", antialias=False
    )


def rot90(x: jax.Array, k: int) -> jax.Array:
    """Quarter turns with a static k, in the reference's direction (torch dims=[-1, -2])."""
    return jnp.rot90(x, k % 4, axes=ROT_AXES)


def rot90_traced(x: jax.Array, k: jax.Array, parity: int | None = None) -> jax.Array:
    """Quarter turns with a traced k in {0, 1, 2, 3}.

    parity=None: all four rotations keep the shape (H == W) and k selects among them. parity=0 or 1: k must have
    that parity (only k and k+2 give the same shape when H != W); it is checked on the host, not here.
    """
    k = jnp.asarray(k, jnp.int32) % 4
    if parity is None:
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"a traced rotation of a non-square {x.shape} needs a static parity.")
        return jax.lax.switch(k, [lambda a, i=i: rot90(a, i) for i in range(4)], x)
    return jax.lax.switch(k // 2, [lambda a: rot90(a, parity), lambda a: rot90(a, parity + 2)], x)
