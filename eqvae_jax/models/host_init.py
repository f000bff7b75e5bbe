"""Random initialisation on the host with numpy, of models built with shape-only variables (`abstract`).

Eager `jax.random` initialisation compiles one small XLA program per weight shape: ~15-25 s for the tiny test
autoencoder or the discriminator on a 2-core CPU, which dominated short runs and tests. Drawing the same
distributions with numpy takes milliseconds and is identical on every backend and device count.

Rules, applied to every module that owns a `kernel` Param (conv or linear) and every normalisation layer:
  kernel  U(+-1/sqrt(fan_in)) (PyTorch's default kaiming_uniform(a=sqrt(5))), or N(0, kernel_std) if given;
  bias    U(+-1/sqrt(fan_in)) of its module's kernel (PyTorch's default);
  norm    scale 1 (+ N(0, norm_scale_std) if given), bias 0; BatchStat mean 0, var 1;
  own     a module that defines `host_init(rng)` initialises its own variables with the numpy Generator `rng`
          (e.g. the VQ codebook, uniform(-1/n, 1/n) like taming).
"""

from __future__ import annotations

from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def _variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {k: v for k, v in vars(module).items() if isinstance(v, nnx.Variable)}


def init_on_host(model: M, seed: int, kernel_std: float | None = None, norm_scale_std: float = 0.0) -> M:
    """Every variable of the abstract `model` drawn with numpy, in place (see module docstring); returns it."""
    rng = np.random.default_rng(seed)
    modules = sorted(((p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)),
                     key=lambda item: tuple(str(x) for x in item[0]))
    for _, module in modules:
        own = _variables(module)
        if callable(getattr(type(module), "host_init", None)):
            module.host_init(rng)
        elif "kernel" in own and isinstance(own["kernel"], nnx.Param):
            shape = own["kernel"].shape
            bound = 1.0 / np.sqrt(int(np.prod(shape[:-1])))
            kernel = (rng.normal(0.0, kernel_std, shape) if kernel_std is not None
                      else rng.uniform(-bound, bound, shape))
            own["kernel"].set_value(jnp.asarray(kernel, own["kernel"].dtype))
            if "bias" in own:
                own["bias"].set_value(jnp.asarray(rng.uniform(-bound, bound, own["bias"].shape), own["bias"].dtype))
        elif "scale" in own:
            scale = 1.0 + (rng.normal(0.0, norm_scale_std, own["scale"].shape) if norm_scale_std else 0.0)
            own["scale"].set_value(jnp.asarray(np.broadcast_to(scale, own["scale"].shape), own["scale"].dtype))
            if "bias" in own:
                own["bias"].set_value(jnp.zeros(own["bias"].shape, own["bias"].dtype))
        for name, var in own.items():
            if isinstance(var, nnx.BatchStat):
                fill = 1.0 if name == "var" else 0.0
                var.set_value(jnp.full(var.shape, fill, var.dtype))
    leftover = [p for p, v in nnx.to_flat_state(nnx.state(model))
                if not hasattr(v.get_value(), "device")]
    if leftover:
        raise ValueError(f"init_on_host: no rule initialised {['/'.join(map(str, p)) for p in leftover]}")
    return model
