"""VJPs through Flax NNX modules, for the adaptive GAN weight inside an outer `jax.grad`.

The adaptive weight needs d(nll)/dW and d(g_loss)/dW for one tensor W (the decoder's last conv kernel), while the
outer training step differentiates the total loss w.r.t. all parameters. Doing this with a second full
`jax.grad` would run the whole decoder (and encoder) backward twice. Instead:

- `vjp_wrt_variable` runs the module forward once under `jax.vjp` with *only W* as the differentiated input. The
  returned function maps a cotangent of the output to dL/dW; since only the last layer depends on W, it costs one
  conv weight-gradient (XLA drops the rest). The forward value stays differentiable for the outer grad.
- `vjp_wrt_input` runs a module (the discriminator, LPIPS) under `jax.vjp` w.r.t. its input, so dL/d(output) of
  the decoder is available as a cotangent. Module state written during the call (BatchNorm running statistics)
  is carried out of the inner trace and written back into the module at the caller's trace level.

The cost of the adaptive weight is then one extra backward of LPIPS and of D w.r.t. their inputs (the reference
pays exactly that too: `torch.autograd.grad(..., retain_graph=True)`) plus two conv weight-gradients per
adaptive-weight group (each over the whole, masked, batch; see losses/autoencoder.grouped_adaptive_weight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


def _variable_at(module: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
    node: Any = module
    for name in path:
        node = node[name] if isinstance(name, int) else getattr(node, name)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{'/'.join(map(str, path))} is a {type(node).__name__}, not an nnx.Variable.")
    return node


def variable_value(module: nnx.Module, path: Sequence[str | int]) -> jax.Array:
    """The array held by the variable at `path` (e.g. ("decoder", "conv_out", "kernel"))."""
    return _variable_at(module, path)[...]


def vjp_wrt_variable(
    module: nnx.Module, path: Sequence[str | int], fn: Callable[[nnx.Module], jax.Array]
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(fn(module), ct -> d<ct, fn(module)>/dW) with W the variable at `path`; fn must not mutate the module."""
    graphdef, state = nnx.split(module)

    def with_value(w: jax.Array) -> jax.Array:
        copy = nnx.merge(graphdef, state, copy=True)
        _variable_at(copy, path)[...] = w
        return fn(copy)

    out, vjp = jax.vjp(with_value, variable_value(module, path))
    return out, lambda ct: vjp(ct)[0]


def vjp_wrt_input(
    module: nnx.Module, x: jax.Array, call: Callable[[nnx.Module, jax.Array], jax.Array] | None = None
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(call(module, x), ct -> d<ct, out>/dx); non-Param state the call writes (BatchStat) goes back into `module`."""
    call = call or (lambda m, a: m(a))
    graphdef, state = nnx.split(module)

    def pure(a: jax.Array) -> tuple[jax.Array, nnx.State]:
        copy = nnx.merge(graphdef, state, copy=True)
        y = call(copy, a)
        return y, nnx.state(copy, nnx.Not(nnx.Param))

    out, vjp, new_state = jax.vjp(pure, x, has_aux=True)
    if jax.tree.leaves(new_state):
        nnx.update(module, new_state)
    return out, lambda ct: vjp(ct)[0]
