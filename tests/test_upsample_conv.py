"""upsample_conv: nearest x2 + 3x3 conv as four 2x2 convs on CPU equals the reference, values and gradients, and
only the CPU lowering uses it."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.models import layers, upsample_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """What LDM's Upsample computes: repeat every pixel 2x2, then a 3x3 conv with one pixel of zero padding."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                        precision=jax.lax.Precision.HIGHEST)


def _inputs(batch: int, h: int, w: int, cin: int, cout: int, seed: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
    ct = jnp.asarray(rng.standard_normal((batch, 2 * h, 2 * w, cout), np.float32))
    return x, k, ct


@pytest.mark.parametrize("batch,h,w,cin,cout", [(2, 5, 7, 4, 6), (1, 8, 8, 16, 16), (3, 1, 1, 2, 3)])
def test_values_and_gradients_match_the_reference(batch, h, w, cin, cout):
    x, k, ct = _inputs(batch, h, w, cin, cout, seed=h * 10 + w)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(fn(x, k) * ct), argnums=(0, 1)))(x, k)

    ours = jax.jit(upsample_conv.nearest2x_conv3x3)(x, k)
    ref = jax.jit(_reference)(x, k)
    assert ours.shape == ref.shape == (batch, 2 * h, 2 * w, cout)
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * scale)
    (_, (dx, dk)), (_, (dx_ref, dk_ref)) = value_and_grads(upsample_conv.nearest2x_conv3x3), value_and_grads(
        _reference)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-6 * float(jnp.abs(dx_ref).max()))
    np.testing.assert_allclose(dk, dk_ref, rtol=0, atol=2e-6 * float(jnp.abs(dk_ref).max()))


def test_the_folded_kernel_reads_each_phase_from_its_two_input_pixels():
    """A kernel of one nonzero tap (i, j) reaches output phase (a, b) exactly where that tap lands on the input."""
    for i in range(3):
        for j in range(3):
            w = jnp.zeros((3, 3, 1, 1)).at[i, j, 0, 0].set(1.0)
            folded = upsample_conv.fold_kernel(w).reshape(2, 2, 2, 2)  # (r, s, a, b)
            for a in (0, 1):
                for b in (0, 1):
                    # upsampled row 2h + a + i - 1 is input row h + (a + i - 1) // 2; tap r reads h + r - 1 + a
                    r, s = (a + i - 1) // 2 + 1 - a, (b + j - 1) // 2 + 1 - b
                    expected = jnp.zeros((2, 2)).at[r, s].set(1.0)
                    np.testing.assert_array_equal(folded[:, :, a, b], expected)


def test_the_upsample_block_equals_repeat_then_its_conv():
    block = layers.Upsample(8, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 4, 8), np.float32))
    ref = block.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    np.testing.assert_allclose(block(x), ref, rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))
    bf16 = layers.Upsample(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))  # other dtypes: the reference path
    assert "nearest2x_conv3x3" not in str(jax.make_jaxpr(lambda x: bf16(x))(x))
    assert "nearest2x_conv3x3" in str(jax.make_jaxpr(lambda x: block(x))(x))


def test_the_other_platforms_branch_is_the_reference_and_its_gradients():
    """TPU/GPU run `_reference` and `_reference_grads` (the CPU never selects them, so they are called directly)."""
    x, k, ct = _inputs(2, 5, 6, 3, 4, seed=7)
    np.testing.assert_allclose(upsample_conv._reference(x, k, jax.lax.Precision.HIGHEST), _reference(x, k),
                               rtol=0, atol=1e-6 * float(jnp.abs(_reference(x, k)).max()))
    dx, dk = upsample_conv._reference_grads(x, k, ct, jax.lax.Precision.HIGHEST)
    dx_ref, dk_ref = jax.vjp(_reference, x, k)[1](ct)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6 * float(jnp.abs(dx_ref).max()))
    np.testing.assert_allclose(dk, dk_ref, rtol=0, atol=1e-6 * float(jnp.abs(dk_ref).max()))


def _ops(platform: str) -> collections.Counter:
    x, k, _ = _inputs(1, 8, 8, 4, 4, seed=0)
    fn = jax.jit(jax.grad(lambda x, k: jnp.sum(upsample_conv.nearest2x_conv3x3(x, k) ** 2), argnums=(0, 1)))
    text = jax.export.export(fn, platforms=[platform])(x, k).mlir_module()
    return collections.Counter(re.findall(r"stablehlo\.\w+", text))


def test_only_the_cpu_lowering_uses_the_phase_convs():
    cpu = _ops("cpu")
    # one wide 2x2 conv forward, four phase convs' input gradients, and conv_grad's loop of tap matmuls for the
    # kernel gradient; the phase gradients are laid out by pads and slices (XLA:CPU's scatter is slow)
    assert cpu["stablehlo.convolution"] == 5
    assert cpu["stablehlo.while"] == 1 and cpu["stablehlo.dot_general"] == 1
    assert "stablehlo.scatter" not in cpu
    # TPU: the reference program (repeat as broadcast, a 3x3 conv, XLA's own gradients), no tap loop
    tpu = _ops("tpu")
    assert "stablehlo.while" not in tpu and tpu["stablehlo.dot_general"] == 0
    assert tpu["stablehlo.convolution"] == 3  # forward, input gradient, kernel gradient
