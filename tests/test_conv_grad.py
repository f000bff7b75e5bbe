"""conv_grad: the tap-matmul kernel gradient equals XLA's, and only the CPU lowering uses it."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqvae_jax.models import conv_grad, layers

NHWC = ("NHWC", "HWIO", "NHWC")

CASES = [  # (kernel, stride, padding, cin, cout, size): the autoencoder's, downsampler's and PatchGAN's convs
    (3, 1, ((1, 1), (1, 1)), 8, 16, 12),
    (3, 2, ((0, 1), (0, 1)), 8, 8, 12),
    (4, 2, ((1, 1), (1, 1)), 3, 8, 16),
    (4, 1, ((1, 1), (1, 1)), 8, 1, 9),
    (1, 1, ((0, 0), (0, 0)), 16, 4, 7),
    (3, 1, "SAME", 4, 4, 10),
    (3, 2, "VALID", 4, 4, 11),
]


def _loss(conv_fn, x, w, strides, padding, ct):
    y = conv_fn(x, w, strides, padding, dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC))
    return jnp.sum(y * ct[..., : y.shape[1], : y.shape[2], :])


@pytest.mark.parametrize("kernel,stride,padding,cin,cout,size", CASES)
def test_gradients_match_xla(kernel, stride, padding, cin, cout, size):
    rng = np.random.default_rng(kernel * 100 + size)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32))
    ct = jnp.asarray(rng.standard_normal((2, size, size, cout), np.float32))
    strides = (stride, stride)
    ours = jax.jit(jax.value_and_grad(lambda x, w: _loss(conv_grad.conv_general_dilated, x, w, strides, padding,
                                                         ct), argnums=(0, 1)))(x, w)
    ref = jax.jit(jax.value_and_grad(lambda x, w: _loss(jax.lax.conv_general_dilated, x, w, strides, padding, ct),
                                     argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    np.testing.assert_array_equal(ours[1][0], ref[1][0])  # input gradient: XLA's own in both
    np.testing.assert_allclose(ours[1][1], ref[1][1], rtol=1e-4, atol=1e-4 * float(jnp.abs(ref[1][1]).max()))


@pytest.mark.parametrize("max_rows,min_cin,batch", [(1 << 16, 1, 2), (1 << 16, 1 << 30, 2), (40, 1, 3), (80, 1, 4),
                                                    (80, 1 << 30, 4)])
def test_kernel_gradient_forms_and_row_chunks(monkeypatch, max_rows, min_cin, batch):
    """Both matmul forms (dy^T @ x_shifted; x_shifted^T @ dy below MIN_CIN_FOR_NN) and a batch split into several
    matmuls per tap (MAX_ROWS_PER_DOT; every case has 6x6 outputs, so 40 rows: one image per matmul; 80: pairs
    for a batch of 4, single images for 3) give XLA's kernel gradient."""
    monkeypatch.setattr(conv_grad, "MAX_ROWS_PER_DOT", max_rows)
    monkeypatch.setattr(conv_grad, "MIN_CIN_FOR_NN", min_cin)
    rng = np.random.default_rng(batch)
    for kernel, stride, pads, cin, cout, size in [(3, 1, ((1, 1), (1, 1)), 5, 7, 6), (3, 2, ((0, 1), (0, 1)), 4, 3, 12),
                                                   (4, 1, ((1, 1), (1, 1)), 6, 1, 7)]:
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
        w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32))
        dy = conv_grad.conv_nhwc(x, w, (stride, stride), pads, None)
        ct = jnp.asarray(rng.standard_normal(dy.shape, np.float32))
        ours = conv_grad.kernel_grad_by_taps(x, ct, w.shape, (stride, stride), pads)
        ref = jax.vjp(functools.partial(_conv_of_kernel, x, (stride, stride), pads), w)[1](ct)[0]
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def _conv_of_kernel(x, strides, pads, w):
    return conv_grad.conv_nhwc(x, w, strides, pads, None)


def test_batch_groups_divide_the_batch_and_fit_the_row_limit():
    assert conv_grad._batch_group(1, 256 * 256) == 1  # one image of 2^16 pixels: one matmul per tap
    assert conv_grad._batch_group(2, 256 * 256) == 1  # two: two matmuls per tap, summed
    assert conv_grad._batch_group(8, 32 * 32) == 8  # small images: the whole batch in one
    assert conv_grad._batch_group(6, 128 * 128) == 3  # 4 would fit, but does not divide 6
    assert conv_grad._batch_group(3, 512 * 512) == 1  # an image over the limit still runs as one


def test_unsupported_shapes_fall_back_to_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 4), np.float32)).astype(jnp.bfloat16)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    fn = jax.jit(lambda x, w: conv_grad.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))
    assert "custom_vjp" not in str(jax.make_jaxpr(fn)(x, w))
    dilated = jax.make_jaxpr(lambda x, w: conv_grad.conv_general_dilated(
        x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn))(x.astype(jnp.float32), w.astype(jnp.float32))
    assert "custom_vjp" not in str(dilated)


def _ops(platform: str, conv_fn) -> collections.Counter:
    """StableHLO op counts of the parameter gradient of a model conv built with `conv_fn`, lowered for `platform`
    (no such device needed)."""
    conv = nnx.Conv(8, 8, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv_fn, rngs=nnx.Rngs(0))
    graph, params = nnx.split(conv)
    x = jnp.ones((1, 16, 16, 8), jnp.float32)

    def param_grad(params, x):
        return jax.grad(lambda p: jnp.sum(nnx.merge(graph, p)(x) ** 2))(params)

    text = jax.export.export(jax.jit(param_grad), platforms=[platform])(params, x).mlir_module()
    return collections.Counter(re.findall(r"stablehlo\.\w+", text))


def test_only_the_cpu_lowering_computes_the_kernel_gradient_by_matmuls():
    cpu = _ops("cpu", conv_grad.conv_general_dilated)
    assert cpu["stablehlo.dot_general"] == 1 and cpu["stablehlo.while"] == 1  # a loop over the 3x3 kernel's taps
    assert cpu["stablehlo.convolution"] == 1  # the forward
    # TPU: a plain nnx.Conv's ops (XLA's own kernel gradient, a convolution), behind a `case` on a constant
    # platform index that XLA folds away; benchmarks/tpu_aot.py shows the compiled programs unchanged.
    ours, plain = _ops("tpu", conv_grad.conv_general_dilated), _ops("tpu", jax.lax.conv_general_dilated)
    assert ours["stablehlo.dot_general"] == plain["stablehlo.dot_general"] == 0
    assert "stablehlo.while" not in ours
    assert ours["stablehlo.convolution"] == plain["stablehlo.convolution"] == 2


def test_model_convs_use_it():
    assert layers.conv(4, 4, 3, rngs=nnx.Rngs(0)).conv_general_dilated is conv_grad.conv_general_dilated


def test_the_gradient_of_a_vjp_keeps_the_tap_kernel_gradient():
    """The generator loss differentiates a function that takes a VJP w.r.t. the decoder's last kernel (the adaptive
    weight): the outer kernel gradient of that conv goes through the custom VJP's forward, and must be the tap
    matmuls too (not XLA's whole-image convolution), with XLA's values."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 12, 12, 8), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 3), np.float32))
    ct = jnp.asarray(rng.standard_normal((1, 12, 12, 3), np.float32))
    pads = ((1, 1), (1, 1))

    def outer(conv, w):
        y, vjp = jax.vjp(lambda w: conv(x, w, (1, 1), pads), w)
        return jnp.sum(y * ct) + jnp.sum(vjp(ct)[0] ** 2)  # a loss of the output and of its own kernel VJP

    ours = jax.jit(jax.grad(functools.partial(outer, lambda x, w, s, p: conv_grad.conv_tap_grad(x, w, s, p, None))))
    ref = jax.grad(functools.partial(outer, lambda x, w, s, p: conv_grad.conv_nhwc(x, w, s, p, None)))(w)
    np.testing.assert_allclose(ours(w), ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))
    hlo = ours.lower(w).compile().as_text()
    assert "window={size=12x12" not in hlo  # XLA's kernel gradient is a convolution with the whole image as window
    assert " while(" in hlo
