"""models/max_pool.py: the forward and, on CPU, the gradient equal XLA's reduce_window max-pool exactly (ties
included: the first maximum of each window, row-major, gets the gradient); other platforms keep XLA's
select-and-scatter."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqvae_jax.models.max_pool import _reduce_window, max_pool_2x2


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (1, 9, 7, 4)])
def test_forward_and_gradient_equal_reduce_window_with_ties(shape):
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # all-zero windows: four-way ties
    x = x.at[:, :2, :2, :].set(0.5)  # a window of equal positive values
    x = x.at[:, 2, 2:4, :].set(0.7)  # two equal maxima in one window
    ct = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    y, vjp = jax.vjp(max_pool_2x2, x)
    y_ref, vjp_ref = jax.vjp(_reduce_window, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    got, want = np.asarray(jax.jit(vjp)(ct)[0]), np.asarray(jax.jit(vjp_ref)(ct)[0])
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) == ct.size  # one element per window receives its gradient


def _ops(platform: str, pool) -> collections.Counter:
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    text = jax.export.export(jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2))), platforms=[platform])(x).mlir_module()
    return collections.Counter(re.findall(r"stablehlo\.\w+", text))


def test_only_the_cpu_lowering_replaces_select_and_scatter():
    assert _ops("cpu", max_pool_2x2)["stablehlo.select_and_scatter"] == 0
    assert _ops("tpu", max_pool_2x2)["stablehlo.select_and_scatter"] == 1
    assert _ops("tpu", _reduce_window)["stablehlo.select_and_scatter"] == 1
