"""DiT / SiT backbone (adaLN-Zero transformer on latent patches), NHWC, Flax NNX.

Mirrors `DiT` from facebookresearch/DiT `models.py` (SiT uses the same network; only the objective differs).
Attribute names follow the reference state dict (`x_embedder.proj`, `t_embedder.mlp.0`, `blocks.N.attn.qkv`,
`adaLN_modulation.1`, ...) with `.` -> `/` and `mlp.0` -> `mlp_0`, so `convert/dit.py`'s key map is obvious.

The transformer blocks are stored stacked (every block variable has a leading `depth` axis) and run with
`jax.lax.scan`, so compile time does not grow with depth. Consequence: XLA's `cost_analysis()` counts the
scanned block once, not `depth` times; use `dit_flops` for model FLOPs. `model(x, t, y, tap=k)` also returns
the tokens after block k (REPA's alignment tap), carried through the one scan. With `z_dim > 0` the model owns
REPA's projector MLP (`projector`, as REPA's SiT owns `projectors`); it is trained with the model and is
unused by sampling.

Precision: parameters are float32; `compute_dtype="bfloat16"` runs the matmuls in bf16 while LayerNorm,
softmax, the timestep frequencies and the residual stream stay float32 (like PyTorch autocast).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.models.repa import PROJECTOR_DIM, Projector
from eqvae_jax.models.variables import Frozen

# (depth, hidden_size, num_heads) of the reference sizes.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
LN_EPS = 1e-6
FREQ_DIM = 256


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of `DiT` (JSON-serialisable; stored in weights directories)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # 0 = reference DiT timestep frequencies exp(-ln(1e4) i / half); diffusers' DiT divides by (half - 1).
    timestep_freq_shift: int = 0
    compute_dtype: str = "float32"
    remat: bool = False
    # REPA: output width of the alignment projector (the teacher's feature size, 768 for DINOv2-B); 0 = none
    z_dim: int = 0
    projector_dim: int = PROJECTOR_DIM  # REPA's projector hidden width

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def dit_config(size: str, patch: int, **overrides: Any) -> DiTConfig:
    """Reference size ('S', 'B', 'L', 'XL') with patch 2, 4 or 8, e.g. dit_config('B', 2) is DiT-B/2."""
    if size not in SIZES or patch not in PATCHES:
        raise ValueError(f"unknown DiT size {size}/{patch}; sizes {sorted(SIZES)}, patches {PATCHES}")
    depth, hidden, heads = SIZES[size]
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **overrides)


def dit_flops(config: DiTConfig, batch: int = 1, train: bool = False) -> float:
    """Model FLOPs (2 x multiply-accumulates) of a forward pass, or forward+backward (3x) if `train`.

    Counts every matmul including attention (QK^T and AV); elementwise ops are ignored. DiT-XL/2 gives
    2 x 118.6e9 per image, the DiT paper's "Gflops" column times two. With `train` and a REPA projector
    (`z_dim > 0`) the projector's per-token MLP is included (SiT-XL/2: 3 x 2 x 2.08e9 per image).
    """
    t, d, p = config.num_patches, config.hidden_size, config.patch_size
    macs = t * p * p * config.in_channels * d  # patch embedding
    macs += FREQ_DIM * d + d * d  # timestep MLP
    per_block = 6 * d * d + t * (4 * d * d + 2 * d * config.mlp_hidden) + 2 * t * t * d
    macs += config.depth * per_block
    macs += 2 * d * d + t * d * p * p * config.out_channels  # final layer
    if train and config.z_dim:
        q = config.projector_dim
        macs += t * (d * q + q * q + q * config.z_dim)  # REPA projector on every token
    return 2.0 * macs * batch * (3 if train else 1)


# ---------------------------------------------------------------------------------------------------------
# Fixed embeddings (numpy, as in the reference / MAE)
# ---------------------------------------------------------------------------------------------------------


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) float32 table, identical to the reference `get_2d_sincos_pos_embed`."""
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for the 2-D sincos embedding")
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0)  # w first, as in the reference
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    return emb.astype(np.float32)


def timestep_embedding(
    t: jax.Array, dim: int = FREQ_DIM, shift: int = 0, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal [cos, sin] embedding of (possibly fractional) timesteps, float32, shape (N, dim)."""
    half = dim // 2
    # host constant: the reference's float32 exponent, exp correctly rounded (XLA's f32 exp is ulps off)
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
    freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _linear(din: int, dout: int, dtype: jnp.dtype, rngs: nnx.Rngs, init: Any = _xavier) -> nnx.Linear:
    return nnx.Linear(
        din, dout, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, bias_init=_zeros, rngs=rngs
    )


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), computed in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nnx.Module):
    """p x p patches -> hidden: a stride-p conv, initialised like a Linear as in the reference."""

    def __init__(self, patch: int, cin: int, hidden: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
        self.proj = nnx.Conv(
            cin,
            hidden,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=init,
            bias_init=_zeros,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
    """Sinusoidal frequencies (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, shift: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.02)
        self.mlp_0 = _linear(FREQ_DIM, hidden, dtype, rngs, normal)
        self.mlp_2 = _linear(hidden, hidden, dtype, rngs, normal)
        self.shift = shift

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_2(nnx.silu(self.mlp_0(timestep_embedding(t, FREQ_DIM, self.shift))))


class LabelEmbedder(nnx.Module):
    """Class embedding table; with dropout > 0 it has one extra row (index num_classes) for the null class."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nnx.Embed(
            num_classes + int(dropout_prob > 0),
            hidden,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

    def __call__(
        self, labels: jax.Array, drop_key: jax.Array | None = None, force_drop_ids: jax.Array | None = None
    ) -> jax.Array:
        """Labels are replaced by the null class where `force_drop_ids == 1`, else with probability
        `dropout_prob` when a `drop_key` is given (training), as `LabelEmbedder.token_drop` does."""
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        elif drop_key is not None and self.dropout_prob > 0:
            drop = jax.random.uniform(drop_key, labels.shape) < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm `Attention` layout); softmax in float32."""

    def __init__(self, hidden: int, heads: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = _linear(hidden, 3 * hidden, dtype, rngs)
        self.proj = _linear(hidden, hidden, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, hidden: int, mlp_hidden: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(hidden, mlp_hidden, dtype, rngs)
        self.fc2 = _linear(mlp_hidden, hidden, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """adaLN-Zero block: x += gate * attn(modulate(LN(x))); x += gate * mlp(modulate(LN(x)))."""

    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        dtype, d = _dtype(config.compute_dtype), config.hidden_size
        self.attn = Attention(d, config.num_heads, dtype, rngs)
        self.mlp = Mlp(d, config.mlp_hidden, dtype, rngs)
        self.adaLN_modulation_1 = _linear(d, 6 * d, dtype, rngs, _zeros)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = self.adaLN_modulation_1(nnx.silu(c)).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        dtype, d, p = _dtype(config.compute_dtype), config.hidden_size, config.patch_size
        self.linear = _linear(d, p * p * config.out_channels, dtype, rngs, _zeros)
        self.adaLN_modulation_1 = _linear(d, 2 * d, dtype, rngs, _zeros)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation_1(nnx.silu(c)).astype(jnp.float32), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class DiT(nnx.Module):
    """Class-conditional diffusion transformer: (x NHWC, t (N,), y (N,)) -> (N, H, W, out_channels), f32."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size {config.input_size} is not a multiple of patch {config.patch_size}")
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}"
            )
        self.config = config
        dtype = _dtype(config.compute_dtype)
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size, dtype, rngs)
        self.t_embedder = TimestepEmbedder(config.hidden_size, config.timestep_freq_shift, dtype, rngs)
        self.y_embedder = LabelEmbedder(
            config.num_classes, config.hidden_size, config.class_dropout_prob, rngs
        )
        grid = config.input_size // config.patch_size
        self.pos_embed = Frozen(jnp.asarray(sincos_pos_embed_2d(config.hidden_size, grid))[None])

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
            return DiTBlock(config, rngs)

        self.blocks = make_blocks(rngs)
        self.final_layer = FinalLayer(config, rngs)
        # last, so that the other parameters draw the same random numbers with or without it
        self.projector = Projector(config.hidden_size, config.z_dim, config.projector_dim,
                                   dtype=config.compute_dtype, rngs=rngs) if config.z_dim else None

    def unpatchify(self, x: jax.Array) -> jax.Array:
        """(N, T, p*p*C) -> (N, H, W, C), the reference's 'nhwpqc' patch layout."""
        p, c = self.config.patch_size, self.config.out_channels
        n, t, _ = x.shape
        h = int(round(math.sqrt(t)))
        x = x.reshape(n, h, h, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h * p, h * p, c)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        drop_key: jax.Array | None = None,
        force_drop_ids: jax.Array | None = None,
        tap: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Forward pass; label dropout happens only with `drop_key` (training) or `force_drop_ids`.

        With `tap=k` (1 <= k <= depth) it returns `(output, tokens)` where tokens (N, T, hidden) float32 are
        the hidden states after the first k blocks (REPA's `encoder_depth`, whose projection is aligned with a
        teacher). The scan then also carries those tokens (selected after block k; one (N, T, hidden) buffer).
        Splitting the scan at k instead (two scans over sliced stacked params) needed 16 GiB more per chip in
        the SiT-XL/2 train step on a TPU v5p-8 (batch 64 per chip; measured 77.3 vs 61.5 GiB ahead of time).
        """
        cfg = self.config
        if x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(
                f"expected input (N, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}), got {x.shape}"
            )
        h = self.x_embedder(x).astype(jnp.float32) + self.pos_embed[...]
        c = self.t_embedder(t).astype(jnp.float32) + self.y_embedder(y, drop_key, force_drop_ids)

        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, block_state: Any) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, block_state)(h, c), None

        if cfg.remat:
            body = jax.checkpoint(body)
        if tap is None:
            h, _ = jax.lax.scan(body, h, state)
        else:
            if not 1 <= tap <= cfg.depth:
                raise ValueError(f"tap={tap}: must be a block count in [1, {cfg.depth}]")

            def tap_body(carry: tuple[jax.Array, jax.Array], xs: tuple[Any, jax.Array]):
                (h, tapped), (block_state, i) = carry, xs
                h, _ = body(h, block_state)
                return (h, jnp.where(i == tap - 1, h, tapped)), None

            (h, tapped), _ = jax.lax.scan(tap_body, (h, jnp.zeros_like(h)), (state, jnp.arange(cfg.depth)))
        out = self.unpatchify(self.final_layer(h, c).astype(jnp.float32))
        return out if tap is None else (out, tapped)


KIND = "dit"


# build(config=None, *, seed=0) (the reference's initialisation), abstract(config=None), load(path, **overrides)
# (e.g. compute_dtype; built shape-only and filled from the file, no random init of DiT-XL's 675M parameters),
# save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(KIND, DiTConfig, lambda config, rngs: DiT(config, rngs=rngs))


@dataclasses.dataclass(frozen=True)
class FunctionalDiT:
    """The static half of a DiT for pure functions of its params: graph definition, the non-trainable
    variables (pos_embed) and the config. Params are a plain nested dict (`nnx.State.to_pure_dict()`)."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    config: DiTConfig

    def apply(self, params: dict[str, Any], x: jax.Array, t: jax.Array, y: jax.Array, **kw: Any) -> jax.Array:
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)(x, t, y, **kw)

    def apply_aligned(self, params: dict[str, Any], x: jax.Array, t: jax.Array, y: jax.Array, tap: int,
                      **kw: Any) -> tuple[jax.Array, jax.Array]:
        """(output, projector(tokens after block `tap`)) (N, T, z_dim) float32: REPA's SiT forward."""
        model = nnx.merge(self.graphdef, nnx.State(params), self.rest)
        if model.projector is None:
            raise ValueError("apply_aligned needs a model with a REPA projector (DiTConfig.z_dim > 0)")
        out, tokens = model(x, t, y, tap=tap, **kw)
        return out, model.projector(tokens)


def functional(model: DiT) -> tuple[FunctionalDiT, dict[str, Any]]:
    """(static half, params as a plain dict) of `model`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return FunctionalDiT(graphdef, rest, model.config), params.to_pure_dict()
