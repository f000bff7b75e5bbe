"""PatchGAN discriminator (taming `NLayerDiscriminator`, BatchNorm variant), NHWC.

Layers (n_layers=3, ndf=64): conv 3->64 k4 s2 + LeakyReLU(0.2); n_layers x [conv k4 s2 (s1 for the last),
no bias, BatchNorm, LeakyReLU(0.2)] with 128/256/512 channels; conv 512->1 k4 s1. Input 256 -> 30x30 logits,
64 -> 6x6. Init as taming's `weights_init`: conv kernels N(0, 0.02), BN scale N(1, 0.02), BN bias 0; the two
biased convs keep PyTorch's default bias init U(+-1/sqrt(fan_in)).

BatchNorm is `torch.nn.BatchNorm2d` (eps 1e-5, momentum 0.1). Train mode normalises with the biased batch
variance and updates the `nnx.BatchStat`s `mean`/`var` as `0.9 * old + 0.1 * batch` (unbiased variance for
`var`); eval mode uses the running statistics. The mode is the attribute `use_running_average` (False =
train, the default: the reference only ever runs D in train mode; nnx's `.train()`/`.eval()` set it) or the
per-call override `d(x, use_running_average=True)`. Every train-mode call is one statistics update, so real
and fake as two calls are each normalised with their own batch statistics (the LDM loss calls D twice). In a pure jitted
step use `apply(graphdef, params, batch_stats, x) -> (logits, new batch_stats)`.

BatchNorm under a sharded batch: inside `jax.jit` the batch is one logical array, so with it sharded over
('data', 'fsdp') the statistics are those of the GLOBAL batch (XLA adds the all-reduce: sync-BN). The
reference (DDP without SyncBatchNorm) normalised each GPU's 10 images on their own. `stats_groups=G` splits
the batch into G equal contiguous groups, each normalised with its own mean/var: with G = the number of data
shards that is per-device BN (each group is one device's shard). Running statistics are updated with the
mean over groups of the per-group statistics (DDP would keep rank 0's, broadcast). The default G=1 is plain
BatchNorm over whatever batch is passed, the same numbers on any device count. A config that wants the
reference's behaviour sets G = number of batch shards (per-device, as DDP) or G = global micro-batch / 10
(the reference's 10 images per statistics group, whatever the device count).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from eqvae_jax.models import conv_grad, weights
from eqvae_jax.models.host_init import init_on_host

KIND = "discriminator"


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Constructor arguments of `NLayerDiscriminator` (stored in weights directories)."""

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    stats_groups: int = 1  # BatchNorm statistics groups (module docstring); not a property of the weights


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d semantics over NHWC (unbiased running var), with optional per-group statistics."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, stats_groups: int = 1, rngs: nnx.Rngs):
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.stats_groups = stats_groups
        self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None,
                 stats_groups: int | None = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra:
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon)
            return (x - self.mean[...]) * inv * self.scale[...] + self.bias[...]
        groups = self.stats_groups if stats_groups is None else stats_groups
        b, h, w, c = x.shape
        if groups < 1 or b % groups:
            raise ValueError(f"stats_groups={groups} must divide the batch size {b}.")
        xg = x.reshape(groups, b // groups, h, w, c)
        mean = jnp.mean(xg, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)  # biased, as torch normalises
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * self.scale[...] + self.bias[...]
        n = (b // groups) * h * w
        batch_mean = jax.lax.stop_gradient(jnp.mean(mean, axis=(0, 1, 2, 3)))
        batch_var = jax.lax.stop_gradient(jnp.mean(var, axis=(0, 1, 2, 3)) * (n / max(n - 1, 1)))
        self.mean[...] = (1.0 - self.momentum) * self.mean[...] + self.momentum * batch_mean
        self.var[...] = (1.0 - self.momentum) * self.var[...] + self.momentum * batch_var
        return y


def _torch_conv(cin: int, cout: int, stride: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    """Conv k4 p1, taming's init: kernel N(0, 0.02); bias (if any) PyTorch's U(+-1/sqrt(fan_in)); kernel gradient
    on CPU as matmuls (`conv_grad`)."""
    bound = 1.0 / math.sqrt(cin * 16)
    return nnx.Conv(
        cin, cout, kernel_size=(4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
        kernel_init=nnx.initializers.normal(0.02),
        bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
        conv_general_dilated=conv_grad.conv_general_dilated, rngs=rngs,
    )


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: `d(x) -> (B, H', W', 1)` logits for NHWC images; BatchNorm modes: module docstring."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *, stats_groups: int = 1,
                 use_running_average: bool = False, rngs: nnx.Rngs):
        self.input_nc, self.ndf, self.n_layers, self.stats_groups = input_nc, ndf, n_layers, stats_groups
        convs = [_torch_conv(input_nc, ndf, 2, True, rngs)]
        norms = []
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            convs.append(_torch_conv(ndf * prev, ndf * mult, 2 if n < n_layers else 1, False, rngs))
            norms.append(BatchNorm(ndf * mult, use_running_average=use_running_average,
                                   stats_groups=stats_groups, rngs=rngs))
        convs.append(_torch_conv(ndf * mult, 1, 1, True, rngs))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    @property
    def config(self) -> DiscriminatorConfig:
        return DiscriminatorConfig(self.input_nc, self.ndf, self.n_layers, self.stats_groups)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None,
                 stats_groups: int | None = None) -> jax.Array:
        h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:-1], self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(conv(h), use_running_average, stats_groups), 0.2)
        return self.convs[-1](h)


def _new(config: DiscriminatorConfig, rngs: nnx.Rngs) -> NLayerDiscriminator:
    return NLayerDiscriminator(config.input_nc, config.ndf, config.n_layers, stats_groups=config.stats_groups,
                               rngs=rngs)


def _init(config: DiscriminatorConfig, seed: int) -> NLayerDiscriminator:
    """taming's weights_init: conv N(0, 0.02), BN scale N(1, 0.02), BN bias 0; drawn on the host (fast)."""
    return init_on_host(abstract(config), seed, kernel_std=0.02, norm_scale_std=0.02)


# build(config=None, *, seed=0) (taming's init), abstract(config=None), load(path, **overrides) (e.g.
# stats_groups=8), save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(KIND, DiscriminatorConfig, _new, init=_init)
