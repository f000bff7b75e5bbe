"""Building blocks shared by the autoencoders (LDM `diffusionmodules/model.py`), NHWC.

Attribute names follow the LDM state dict (norm1/conv1/norm2/conv2/nin_shortcut, norm/q/k/v/proj_out), so a
block's NNX path reads like its PyTorch key. Parameters are float32; `dtype` is the compute dtype of convs,
linears and residual adds. GroupNorm statistics and the attention softmax always run in float32.

`Encoder` and `Decoder` are the LDM / taming autoencoder trunk shared by the KL-VAE (`models.kl_vae`) and the
VQ-VAE (`models.vq_vae`), described by a `Trunk`: levels of ResnetBlocks (optionally each followed by an
attention block, LDM `down.{i}.attn.{j}` / `up.{i}.attn.{j}`), a mid block and GN-swish-conv_out.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from eqvae_jax.models import conv_grad, upsample_conv

Dtype = jnp.dtype | type

# PyTorch's default conv/linear weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nnx.Initializer:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: str | int = "same",
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A PyTorch-initialised square conv; integer `padding` pads that many pixels on every side. Its kernel
    gradient on CPU runs as matmuls (`conv_grad`)."""
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding.upper()  # a tuple: graphs hash
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=stride, padding=pad, dtype=dtype,
        kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(in_ch * kernel * kernel),
        conv_general_dilated=conv_grad.conv_general_dilated, rngs=rngs,
    )


def linear(in_ch: int, out_ch: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """A PyTorch-initialised linear layer (a 1x1 conv over the channels of an NHWC tensor)."""
    return nnx.Linear(in_ch, out_ch, dtype=dtype, kernel_init=_torch_kernel_init,
                      bias_init=_torch_bias_init(in_ch), rngs=rngs)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC: biased variance over (H, W, channels of the group), in float32.

    Two-pass statistics (mean, then mean of squared deviations) like PyTorch, not E[x^2] - E[x]^2, so
    parity holds at full network depth. The output is cast back to `dtype`.

    Each pass reduces over (H, W) per channel first and then adds a group's channels (tiny), and the
    normalisation is one multiply-add per element with per-channel factors: on XLA:CPU this ran the forward
    1.5x and forward+backward 2x faster than reducing a (B, H, W, groups, C/groups) view over (1, 2, 4)
    (docs/cpu_speed.md).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, epsilon: float = 1e-6, *,
                 dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups.")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        per_group = c // self.num_groups
        count = h * w * per_group
        x = x.astype(jnp.float32)

        def group_mean(v: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, 1, 1, C): its group's mean per channel
            sums = jnp.sum(v, axis=(1, 2)).reshape(b, self.num_groups, per_group).sum(axis=2) / count
            return jnp.repeat(sums, per_group, axis=1)[:, None, None, :]

        mean = group_mean(x)
        var = group_mean(jnp.square(x - mean))
        factor = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return (x * factor + (self.bias[...] - mean * factor)).astype(self.dtype)


class ResnetBlock(nnx.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 `nin_shortcut` when channels change.

    No time embedding and no dropout: the KL/VQ autoencoders use temb_ch=0 and dropout=0.0.
    """

    def __init__(self, in_ch: int, out_ch: int, *, num_groups: int, epsilon: float,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_ch, num_groups, epsilon, dtype=dtype)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_ch, num_groups, epsilon, dtype=dtype)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, dtype=dtype, rngs=rngs)
        self.nin_shortcut = (conv(in_ch, out_ch, 1, padding=0, dtype=dtype, rngs=rngs)
                             if in_ch != out_ch else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, with a residual: GN, q/k/v,
    softmax(q k^T / sqrt(C)) v, proj_out. q/k/v/proj_out are Linear (LDM: 1x1 convs, diffusers: Linear)."""

    def __init__(self, ch: int, *, num_groups: int, epsilon: float, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.norm = GroupNorm(ch, num_groups, epsilon, dtype=dtype)
        self.q = linear(ch, ch, dtype=dtype, rngs=rngs)
        self.k = linear(ch, ch, dtype=dtype, rngs=rngs)
        self.v = linear(ch, ch, dtype=dtype, rngs=rngs)
        self.proj_out = linear(ch, ch, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.astype(self.dtype)
        hn = self.norm(x).reshape(b, h * w, c)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)
        scores = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v)
        return x + self.proj_out(out).reshape(b, h, w, c)


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv (LDM `Downsample(with_conv=True)`)."""

    def __init__(self, ch: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, stride=2, padding="valid", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv (LDM `Upsample(with_conv=True)`). In float32 it runs as
    `upsample_conv.nearest2x_conv3x3` (on CPU: 2x2 convs of the small input, one per output phase, 4/9 of the
    FLOPs); the parameters are those of the plain `conv`."""

    def __init__(self, ch: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, padding=1, dtype=dtype, rngs=rngs)

    def _folds(self, x: jax.Array) -> bool:
        """Does `nearest2x_conv3x3` compute exactly what `self.conv` would (float32, 3x3, stride 1, pad 1)?"""
        c = self.conv
        return (x.dtype == c.kernel[...].dtype == jnp.float32 and c.bias is not None
                and c.bias[...].dtype == jnp.float32 and jnp.dtype(c.dtype) == jnp.float32
                and tuple(c.kernel_size) == (3, 3) and c.padding == ((1, 1), (1, 1)) and c.strides in (1, (1, 1))
                and c.input_dilation in (1, (1, 1)) and c.kernel_dilation in (1, (1, 1))
                and c.feature_group_count == 1 and c.mask is None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self._folds(x):
            return upsample_conv.nearest2x_conv3x3(x, self.conv.kernel[...], self.conv.precision) + self.conv.bias[...]
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


@dataclasses.dataclass(frozen=True)
class Trunk:
    """The shape of an LDM Encoder/Decoder pair (LDM's ddconfig minus the in/out/latent channels).

    Level i has `base_channels * channel_mult[i]` channels. Attention follows LDM: a level gets an AttnBlock
    after each of its ResnetBlocks when its *configured* resolution is in `attn_resolutions`, where the encoder
    starts at `resolution` and halves after every level but the last, and the decoder starts at
    `resolution // 2 ** (levels - 1)` and doubles; the input size at run time does not matter.
    """

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    mid_attention: bool = True
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: str = "float32"

    def encoder_attention(self) -> tuple[bool, ...]:
        """Per encoder level: does it have attention blocks (LDM `Encoder.__init__`'s curr_res rule)."""
        out, res = [], self.resolution
        for i in range(len(self.channel_mult)):
            out.append(res in self.attn_resolutions)
            if i != len(self.channel_mult) - 1:
                res //= 2
        return tuple(out)

    def decoder_attention(self) -> tuple[bool, ...]:
        """Per decoder level i (LDM indexing: up[0] is the full-resolution level)."""
        n = len(self.channel_mult)
        res = self.resolution // 2 ** (n - 1)
        out = [False] * n
        for i in reversed(range(n)):
            out[i] = res in self.attn_resolutions
            if i != 0:
                res *= 2
        return tuple(out)


def _block_kwargs(trunk: Trunk, rngs: nnx.Rngs) -> dict:
    return dict(num_groups=trunk.norm_num_groups, epsilon=trunk.norm_eps, dtype=jnp.dtype(trunk.dtype), rngs=rngs)


class _Level(nnx.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (one AttnBlock after each, or None), then
    `downsample` (encoder) / `upsample` (decoder) or neither (the encoder's last, the decoder's level 0)."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attention: bool, resample: str | None,
                 trunk: Trunk, rngs: nnx.Rngs):
        kw = _block_kwargs(trunk, rngs)
        blocks = []
        for _ in range(n_blocks):
            blocks.append(ResnetBlock(in_ch, out_ch, **kw))
            in_ch = out_ch
        self.block = nnx.List(blocks)
        self.attn = nnx.List([AttnBlock(out_ch, **kw) for _ in range(n_blocks)]) if attention else None
        dtype = jnp.dtype(trunk.dtype)
        self.downsample = Downsample(out_ch, dtype=dtype, rngs=rngs) if resample == "down" else None
        self.upsample = Upsample(out_ch, dtype=dtype, rngs=rngs) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn is not None:
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class _Mid(nnx.Module):
    """block_1 -> attn_1 (optional) -> block_2 at the lowest resolution."""

    def __init__(self, ch: int, trunk: Trunk, rngs: nnx.Rngs):
        kw = _block_kwargs(trunk, rngs)
        self.block_1 = ResnetBlock(ch, ch, **kw)
        self.attn_1 = AttnBlock(ch, **kw) if trunk.mid_attention else None
        self.block_2 = ResnetBlock(ch, ch, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    """conv_in -> levels (ResnetBlocks [+ attention], Downsample but the last) -> mid -> GN, swish, conv_out.

    `out_channels` is conv_out's width: 2 * latent channels for the KL-VAE (double_z), z_channels for the VQ.
    """

    def __init__(self, trunk: Trunk, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(trunk.dtype)
        ch, mult = trunk.base_channels, trunk.channel_mult
        self.conv_in = conv(in_channels, ch, 3, padding=1, dtype=dtype, rngs=rngs)
        in_mult = (1, *mult)
        attention = trunk.encoder_attention()
        self.down = nnx.List([
            _Level(ch * in_mult[i], ch * mult[i], trunk.num_res_blocks, attention[i],
                   "down" if i != len(mult) - 1 else None, trunk, rngs)
            for i in range(len(mult))
        ])
        self.mid = _Mid(ch * mult[-1], trunk, rngs)
        self.norm_out = GroupNorm(ch * mult[-1], trunk.norm_num_groups, trunk.norm_eps, dtype=dtype)
        self.conv_out = conv(ch * mult[-1], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """conv_in -> mid -> levels from the lowest resolution up (num_res_blocks+1 ResnetBlocks [+ attention],
    Upsample but level 0) -> GN, swish, conv_out. `up[i]` is level i, as in LDM. `conv_out.kernel` is the layer
    the adaptive GAN weight differentiates against."""

    def __init__(self, trunk: Trunk, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(trunk.dtype)
        ch, mult = trunk.base_channels, trunk.channel_mult
        self.conv_in = conv(in_channels, ch * mult[-1], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid = _Mid(ch * mult[-1], trunk, rngs)
        attention = trunk.decoder_attention()
        in_of = lambda i: ch * mult[min(i + 1, len(mult) - 1)]
        self.up = nnx.List([
            _Level(in_of(i), ch * mult[i], trunk.num_res_blocks + 1, attention[i], "up" if i != 0 else None,
                   trunk, rngs)
            for i in range(len(mult))
        ])
        self.norm_out = GroupNorm(ch * mult[0], trunk.norm_num_groups, trunk.norm_eps, dtype=dtype)
        self.conv_out = conv(ch * mult[0], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))
