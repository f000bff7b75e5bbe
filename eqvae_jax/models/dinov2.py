"""DINOv2 ViT (Oquab et al. 2023) as a frozen Flax NNX feature extractor, NHWC: REPA's alignment teacher.

    from eqvae_jax.models import dinov2
    m = dinov2.load(path)        # weights directory from `python -m eqvae_jax.convert --kind dinov2`
    out = m(x)                   # x: float (B, H, W, 3), already ImageNet-normalised; H, W multiples of 14
    out["x_norm_patchtokens"]    # (B, H/14 * W/14, D), row-major patch order
    out["x_norm_clstoken"]       # (B, D); also "x_norm_regtokens" (B, R, D) when the model has registers

The network is the torch-hub `DinoVisionTransformer` (facebookresearch/dinov2 `vision_transformer.py`) and
transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (same computation): stride-14 patch conv, a class
token, learned absolute position embeddings (class + patch grid; registers get none), optional register
tokens inserted after the class token, pre-norm blocks `x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))`
with LayerScale, LayerNorm eps 1e-6, exact-erf GELU MLP (ViT-g: fused SwiGLU, hidden (int(4d*2/3)+7)//8*8),
and a final LayerNorm whose output is split into the returned tokens. Variable names follow the torch-hub
state dict (`patch_embed/proj`, `blocks/attn/qkv`, `blocks/ls1/gamma`, `norm`, `mask_token`, ...), the
layout REPA loads; transformers' layout is mapped by `eqvae_jax.convert.dinov2`.

Position embeddings are stored at the checkpoint's grid (37x37 for the 518 px pretraining). An input whose
patch grid differs gets them resampled inside the forward pass, by `pos_interpolation`:
  "antialias"  bicubic (a=-0.5), antialias on, output size given: timm's `resample_abs_pos_embed` defaults,
               which REPA applies once to the torch-hub model (37x37 -> 16x16 for 224 px inputs); also what
               the hub `_reg` models and transformers' `Dinov2WithRegistersModel` compute. The default.
  "bicubic"    torch bicubic (a=-0.75), no antialias, output size given: transformers' `Dinov2Model`.
The torch-hub non-register models' own `interpolate_pos_encoding` is a third formula (scale_factor =
(grid + 0.1) / 37, no antialias) that REPA never reaches (its pos_embed already matches the input); it is not
implemented. Both implemented formulas are `jax.image.resize(method="bicubic-pytorch")`, which matches
torch's `F.interpolate(mode="bicubic", align_corners=False)` to ~1e-6 with and without antialias (plain
`method="bicubic"` is torch's antialiased kernel only).

Every weight is a `Frozen` variable (never an `nnx.Param`): optimizers never see the teacher. The blocks are
stored stacked (leading `depth` axis) and run with `jax.lax.scan`, like models/dit.py. Parameters are
float32; `compute_dtype="bfloat16"` runs the patch conv and matmuls in bf16 while LayerNorm, softmax and the
residual stream stay float32; outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.variables import Frozen
from eqvae_jax.typed_config import from_section

KIND = "dinov2"
FFNS = ("mlp", "swiglu")
POS_INTERPOLATIONS = ("antialias", "bicubic")

# name: (hidden_size, depth, num_heads, ffn) of the torch-hub models (patch 14, mlp_ratio 4, 518 px).
SIZES: dict[str, tuple[int, int, int, str]] = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
NUM_REGISTERS = 4  # the hub's `dinov2_vit*14_reg` models


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """Constructor arguments of `DINOv2` (JSON round-trippable; stored in weights directories)."""

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (Linear-GELU-Linear) or "swiglu" (hub "swiglufused", ViT-g)
    patch_size: int = 14
    pos_grid: int = 37  # side of the stored position-embedding grid: 518 px pretraining / 14
    num_register_tokens: int = 0
    use_mask_token: bool = True  # a stored (unused at inference) mask token, as in both reference layouts
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    pos_interpolation: str = "antialias"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.ffn not in FFNS:
            raise ValueError(f"DINOv2Config: ffn must be one of {FFNS}, got {self.ffn!r}.")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"DINOv2Config: pos_interpolation must be one of {POS_INTERPOLATIONS}, got {self.pos_interpolation!r}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}.")
        jnp.dtype(self.compute_dtype)  # fail early on an unknown dtype name

    @property
    def mlp_hidden(self) -> int:
        """FFN width: int(d * mlp_ratio), or for SwiGLU two thirds of it rounded up to a multiple of 8."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return hidden if self.ffn == "mlp" else (int(hidden * 2 / 3) + 7) // 8 * 8

    @property
    def image_size(self) -> int:
        """The resolution whose patch grid equals the stored position-embedding grid."""
        return self.pos_grid * self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DINOv2Config:
        return from_section(cls, d)


def preset(name: str, **overrides: Any) -> DINOv2Config:
    """A torch-hub model's config: 'vits14', 'vitb14', 'vitl14', 'vitg14', each also with '_reg' (4 registers)."""
    base = name.removesuffix("_reg")
    if base not in SIZES:
        raise ValueError(f"unknown DINOv2 preset {name!r}; known: {sorted(PRESETS)}")
    hidden, depth, heads, ffn = SIZES[base]
    registers = NUM_REGISTERS if name.endswith("_reg") else 0
    cfg = DINOv2Config(hidden_size=hidden, depth=depth, num_heads=heads, ffn=ffn, num_register_tokens=registers)
    return dataclasses.replace(cfg, **overrides)


PRESETS = {n: functools.partial(preset, n) for base in SIZES for n in (base, f"{base}_reg")}


def dinov2_flops(config: DINOv2Config, image_size: int = 224, batch: int = 1) -> float:
    """Model FLOPs (2 x multiply-accumulates) of one forward pass at `image_size` (all matmuls and the
    attention products; elementwise ops and the position-embedding resampling ignored). DINOv2-B/14 at 224 px
    is 2 x 23.2e9 per image."""
    grid = image_size // config.patch_size
    d, p = config.hidden_size, config.patch_size
    tokens = grid * grid + 1 + config.num_register_tokens
    ffn = (2 if config.ffn == "mlp" else 3) * d * config.mlp_hidden
    macs = grid * grid * p * p * config.in_channels * d  # patch embedding
    macs += config.depth * (tokens * (4 * d * d + ffn) + 2 * tokens * tokens * d)
    return 2.0 * macs * batch


# ---------------------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------------------


def resample_pos_embed(
    pos_embed: jax.Array, grid: tuple[int, int], num_prefix_tokens: int = 1, antialias: bool = True
) -> jax.Array:
    """(1, prefix + G*G, D) -> (1, prefix + gh*gw, D): the square grid resized to `grid` in float32, prefix
    (class) rows unchanged; unchanged when the grid already matches.

    With `antialias` it is timm's `resample_abs_pos_embed(posemb, grid)` (F.interpolate bicubic, antialias,
    size=grid), without it transformers' `Dinov2Model.interpolate_pos_encoding` (bicubic, size=grid).
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding has {n} grid tokens, not a square grid")
    gh, gw = grid
    if (gh, gw) == (side, side):
        return pos_embed
    d = pos_embed.shape[-1]
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    table = table.astype(jnp.float32).reshape(1, side, side, d)
    table = jax.image.resize(table, (1, gh, gw, d), method="bicubic-pytorch", antialias=antialias)
    table = table.reshape(1, gh * gw, d).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, table], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Layers (all Frozen; `lead` is the stacked-blocks prefix of the variable shapes)
# ---------------------------------------------------------------------------------------------------------


def _frozen(shape: tuple[int, ...]) -> Frozen:
    return Frozen(jnp.zeros(shape, jnp.float32))


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out); the matmul in `dtype`, output float32."""

    def __init__(self, din: int, dout: int, dtype: jnp.dtype, lead: tuple[int, ...] = ()):
        self.kernel = _frozen((*lead, din, dout))
        self.bias = _frozen((*lead, dout))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return y + self.bias[...]


class LayerNorm(nnx.Module):
    """Affine LayerNorm over the last axis, in float32."""

    def __init__(self, dim: int, eps: float, lead: tuple[int, ...] = ()):
        self.scale = Frozen(jnp.ones((*lead, dim), jnp.float32))
        self.bias = _frozen((*lead, dim))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class LayerScale(nnx.Module):
    def __init__(self, dim: int, lead: tuple[int, ...] = ()):
        self.gamma = Frozen(jnp.ones((*lead, dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection ([q; k; v] along the output axis)."""

    def __init__(self, dim: int, heads: int, dtype: jnp.dtype, lead: tuple[int, ...] = ()):
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, dtype, lead)
        self.proj = Linear(dim, dim, dtype, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        dtype = self.qkv.dtype
        qkv = self.qkv(x).astype(dtype).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, dtype: jnp.dtype, lead: tuple[int, ...] = ()):
        self.fc1 = Linear(dim, hidden, dtype, lead)
        self.fc2 = Linear(hidden, dim, dtype, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(nnx.Module):
    """w12 -> (x1, x2) halves -> silu(x1) * x2 -> w3 (the hub's SwiGLUFFNFused)."""

    def __init__(self, dim: int, hidden: int, dtype: jnp.dtype, lead: tuple[int, ...] = ()):
        self.w12 = Linear(dim, 2 * hidden, dtype, lead)
        self.w3 = Linear(hidden, dim, dtype, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class Block(nnx.Module):
    """x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x)); residual stream float32."""

    def __init__(self, config: DINOv2Config, lead: tuple[int, ...] = ()):
        d, dtype, eps = config.hidden_size, jnp.dtype(config.compute_dtype), config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps, lead)
        self.attn = Attention(d, config.num_heads, dtype, lead)
        self.ls1 = LayerScale(d, lead)
        self.norm2 = LayerNorm(d, eps, lead)
        ffn = Mlp if config.ffn == "mlp" else SwiGLU
        self.mlp = ffn(d, config.mlp_hidden, dtype, lead)
        self.ls2 = LayerScale(d, lead)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Conv(nnx.Module):
    """The patch projection's variables: kernel HWIO (p, p, C, D) and bias, as torch's Conv2d weight/bias."""

    def __init__(self, patch: int, cin: int, dim: int):
        self.kernel = _frozen((patch, patch, cin, dim))
        self.bias = _frozen((dim,))


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> hidden (a stride-p conv), flattened row-major to (B, N, D)."""

    def __init__(self, patch: int, cin: int, dim: int, dtype: jnp.dtype):
        self.proj = Conv(patch, cin, dim)
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.proj.kernel[...].astype(self.dtype), (self.patch, self.patch), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32,
        )
        y = y + self.proj.bias[...]
        return y.reshape(y.shape[0], -1, y.shape[-1])


class DINOv2(nnx.Module):
    """Frozen DINOv2 ViT: `m(x)` -> dict of final-LayerNorm token features (see the module docstring)."""

    def __init__(self, config: DINOv2Config):
        self.config = config
        d = config.hidden_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, d, jnp.dtype(config.compute_dtype))
        self.cls_token = _frozen((1, 1, d))
        self.pos_embed = _frozen((1, 1 + config.pos_grid**2, d))
        self.register_tokens = _frozen((1, config.num_register_tokens, d)) if config.num_register_tokens else None
        self.mask_token = _frozen((1, d)) if config.use_mask_token else None
        self.blocks = Block(config, lead=(config.depth,))
        self.norm = LayerNorm(d, config.layer_norm_eps)

    def pos_embed_for(self, grid: tuple[int, int]) -> jax.Array:
        """The (1, 1 + gh*gw, D) position embedding for a patch grid (resampled by `pos_interpolation`)."""
        antialias = self.config.pos_interpolation == "antialias"
        return resample_pos_embed(self.pos_embed[...], grid, 1, antialias)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """x: (B, H, W, C) float, ImageNet-normalised, H and W multiples of the patch size."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"DINOv2 expects NHWC input with {cfg.in_channels} channels, got shape {x.shape}.")
        b, h, w, _ = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}.")
        tokens = self.patch_embed(x)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed_for((h // p, w // p))
        r = cfg.num_register_tokens
        if r:
            regs = jnp.broadcast_to(self.register_tokens[...], (b, r, cfg.hidden_size))
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)

        graphdef, state = nnx.split(self.blocks)

        def body(t: jax.Array, block_state: Any) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, block_state)(t), None

        tokens, _ = jax.lax.scan(body, tokens, state)
        normed = self.norm(tokens)
        out = {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1 + r:], "x_prenorm": tokens}
        if r:
            out["x_norm_regtokens"] = normed[:, 1:1 + r]
        return out


# ---------------------------------------------------------------------------------------------------------
# Construction, loading, saving
# ---------------------------------------------------------------------------------------------------------


def random_variables(config: DINOv2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat random variables with the reference init, drawn with numpy: weights and pos_embed truncated
    N(0, 0.02) (at +-2 std), biases 0, LayerNorm 1/0, LayerScale 1 (the hub's init_values), class and
    register tokens N(0, 1e-6), mask token 0. For tests and benchmarks; real use loads converted weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(weights.variable_shapes(abstract(config)).items()):
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "kernel" or key == "pos_embed":
            value = np.clip(rng.normal(0.0, 0.02, shape), -0.04, 0.04)
        elif leaf in ("scale", "gamma"):
            value = np.ones(shape)
        elif key in ("cls_token", "register_tokens"):
            value = rng.normal(0.0, 1e-6, shape)
        else:  # biases, mask token
            value = np.zeros(shape)
        out[key] = value.astype(np.float32)
    return out


# build(config=None, *, seed=0) (`random_variables`), abstract(config=None), load(path, **overrides) (only fields
# that do not change the weights: compute_dtype, pos_interpolation), save(model, path): `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, DINOv2Config, lambda config, rngs: DINOv2(config), random_variables=random_variables,
    load_overrides=("compute_dtype", "pos_interpolation"))
