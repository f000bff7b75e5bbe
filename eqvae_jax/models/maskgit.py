"""MaskGIT's bidirectional transformer over VQ tokens (valeoai/Maskgit-pytorch v1 `MaskTransformer`), Flax NNX.

    model = maskgit.build(maskgit.PRESETS["base"]())      # or maskgit.load(weights_dir)
    logits = model(tokens, labels, drop_label)             # tokens (B, 16, 16) or (B, 256) int, labels (B,)
    # logits: (B, 256, 1025) float32 over the 1024 codes + the mask id, per image position

Vocabulary of the one embedding table `tok_emb` (2026 rows for 1024 codes and 1000 classes): codes
0..1023, the mask id 1024, class y at y + 1025, and the dropped-label (unconditional) token 2025. The class
token is appended after the 256 image tokens (257 positions; `class_token_first` puts it in front, as
google-research/maskgit does). Then a learned position embedding, `first_layer` (LN(eps 1e-12) - Dropout -
Linear - GELU - LN(1e-12) - Dropout - Linear), pre-LN blocks (LN(1e-5) -> multi-head attention with
dropout on the attention weights, LN(1e-5) -> Linear - GELU - Dropout - Linear - Dropout, both residual),
`last_layer` (LN(1e-12) - Dropout - Linear - GELU - LN(1e-12)), and tied output weights: logits =
h @ tok_emb^T + a per-position bias (257, 2026), of which only the image positions and the first
codebook_size + 1 columns (codes and mask) are returned. Computing just that slice gives the reference's
numbers and gradients with half the output matmul. GELU is the exact (erf) one.

Attribute names follow the reference state dict: `tok_emb`, `pos_emb`, `bias`, `first_layer/linear_2` is
`first_layer.2`, and the per-layer `transformer.layers.{i}.0.norm` / `.0.fn.mha.in_proj_*` /
`.1.fn.net.0` are `blocks/attn/norm`, `blocks/attn/mha/in_proj`, `blocks/ff/net_0` (see convert/maskgit.py).
The blocks are stored stacked (a leading `depth` axis on every block variable) and run with `jax.lax.scan`,
so compile time does not grow with depth; that depth axis must never be sharded (`parallel.mesh.SCANNED_LAYERS`).

Dropout (rate `dropout`, 0.1 in the reference, everywhere the reference has it) is active only when a
`dropout_key` is passed: no key means the reference's eval mode. Precision: parameters float32;
`compute_dtype="bfloat16"` runs the matmuls in bf16 while LayerNorm, softmax, the residual stream and the
logits stay float32 (the reference trained under fp16 autocast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.models import weights
from eqvae_jax.typed_config import from_section

KIND = "maskgit"
PREFIX_EPS = 1e-12  # LayerNorms of first_layer / last_layer
BLOCK_EPS = 1e-5  # torch.nn.LayerNorm's default, the blocks' PreNorm


@dataclasses.dataclass(frozen=True)
class MaskGITConfig:
    """Constructor arguments of `MaskGIT` (JSON round-trippable).

    `grid_size` is the token grid side (the reference calls it patch_size / f_factor: 256 px / 16 = 16).
    """

    hidden_dim: int = 768
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 3072
    codebook_size: int = 1024
    grid_size: int = 16
    num_classes: int = 1000
    dropout: float = 0.1
    class_token_first: bool = False
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim % self.heads:
            raise ValueError(f"MaskGITConfig: hidden_dim {self.hidden_dim} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MaskGITConfig: dropout {self.dropout} not in [0, 1)")

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def seq_len(self) -> int:
        return self.num_tokens + 1

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def drop_label_id(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @property
    def vocab_size(self) -> int:
        """Rows of tok_emb: codes, mask id, classes, dropped label."""
        return self.codebook_size + 1 + self.num_classes + 1

    @property
    def num_logits(self) -> int:
        """Output classes: the codes and the mask id."""
        return self.codebook_size + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaskGITConfig:
        return from_section(cls, d)


def base(**overrides: Any) -> MaskGITConfig:
    """The paper's / valeoai v1 "base": 24 layers, width 768, 16 heads, MLP 3072 over 16x16 f16 n1024 tokens."""
    return dataclasses.replace(MaskGITConfig(), **overrides)


def big(**overrides: Any) -> MaskGITConfig:
    """valeoai v1 "big": 32 layers, width 1024, 16 heads, MLP 3072."""
    return dataclasses.replace(MaskGITConfig(hidden_dim=1024, depth=32), **overrides)


def huge(**overrides: Any) -> MaskGITConfig:
    """valeoai v1 "huge": 48 layers, width 1024, 16 heads, MLP 3072."""
    return dataclasses.replace(MaskGITConfig(hidden_dim=1024, depth=48), **overrides)


def tiny(**overrides: Any) -> MaskGITConfig:
    """2 layers of width 64 over the same 16x16 grid, 1024 codes and 1000 classes (tests, smoke runs)."""
    return dataclasses.replace(MaskGITConfig(hidden_dim=64, depth=2, heads=2, mlp_dim=128), **overrides)


PRESETS: dict[str, Callable[..., MaskGITConfig]] = {"base": base, "big": big, "huge": huge, "tiny": tiny}


def maskgit_flops(config: MaskGITConfig, batch: int = 1, train: bool = False) -> float:
    """Model FLOPs (2 x multiply-accumulates) of a forward pass, or forward+backward (3x) if `train`.

    Every matmul including attention (QK^T and AV) and the sliced output projection; elementwise ops and the
    embedding lookup are ignored.
    """
    n, d = config.seq_len, config.hidden_dim
    macs = 2 * n * d * d  # first_layer
    macs += config.depth * (n * (4 * d * d + 2 * d * config.mlp_dim) + 2 * n * n * d)
    macs += n * d * d  # last_layer
    macs += config.num_tokens * d * config.num_logits  # tied output weights
    return 2.0 * macs * batch * (3 if train else 1)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout like torch (keep with prob 1 - rate, scale by 1 / (1 - rate)); identity without key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _linear(din: int, dout: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # values come from `init_values` (numpy, the reference's init); these initializers only fix shapes
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis in float32 (two-pass variance), output in `dtype`."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class MultiheadAttention(nnx.Module):
    """torch.nn.MultiheadAttention self-attention: fused in_proj (q, k, v), out_proj, dropout on the weights."""

    def __init__(self, dim: int, heads: int, rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.rate = rate
        self.in_proj = _linear(dim, 3 * dim, dtype, rngs)
        self.out_proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.in_proj(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
        probs = dropout(jax.nn.softmax(scores, axis=-1), self.rate, key).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d))


class PreNormAttention(nnx.Module):
    def __init__(self, config: MaskGITConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.compute_dtype)
        self.norm = LayerNorm(config.hidden_dim, BLOCK_EPS, dtype)
        self.mha = MultiheadAttention(config.hidden_dim, config.heads, config.dropout, dtype, rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.mha(self.norm(x), key)


class PreNormFeedForward(nnx.Module):
    """LN -> Linear -> GELU -> Dropout -> Linear -> Dropout (the reference's `net.0` and `net.3`)."""

    def __init__(self, config: MaskGITConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.compute_dtype)
        self.rate = config.dropout
        self.norm = LayerNorm(config.hidden_dim, BLOCK_EPS, dtype)
        self.net_0 = _linear(config.hidden_dim, config.mlp_dim, dtype, rngs)
        self.net_3 = _linear(config.mlp_dim, config.hidden_dim, dtype, rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        k1, k2 = _split(key, 2)
        h = dropout(jax.nn.gelu(self.net_0(self.norm(x)), approximate=False), self.rate, k1)
        return dropout(self.net_3(h), self.rate, k2)


class Block(nnx.Module):
    """x += attn(LN(x)); x += ff(LN(x)); the residual stream is float32."""

    def __init__(self, config: MaskGITConfig, rngs: nnx.Rngs):
        self.attn = PreNormAttention(config, rngs)
        self.ff = PreNormFeedForward(config, rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        k1, k2 = _split(key, 2)
        x = x + self.attn(x, k1).astype(jnp.float32)
        return x + self.ff(x, k2).astype(jnp.float32)


class FirstLayer(nnx.Module):
    """LN(1e-12) - Dropout - Linear - GELU - LN(1e-12) - Dropout - Linear (reference indices 0..6)."""

    def __init__(self, config: MaskGITConfig, rngs: nnx.Rngs):
        dtype, d = jnp.dtype(config.compute_dtype), config.hidden_dim
        self.rate = config.dropout
        self.norm_0 = LayerNorm(d, PREFIX_EPS, dtype)
        self.linear_2 = _linear(d, d, dtype, rngs)
        self.norm_4 = LayerNorm(d, PREFIX_EPS, dtype)
        self.linear_6 = _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        k1, k2 = _split(key, 2)
        h = jax.nn.gelu(self.linear_2(dropout(self.norm_0(x), self.rate, k1)), approximate=False)
        return self.linear_6(dropout(self.norm_4(h), self.rate, k2)).astype(jnp.float32)


class LastLayer(nnx.Module):
    """LN(1e-12) - Dropout - Linear - GELU - LN(1e-12) (reference indices 0..4)."""

    def __init__(self, config: MaskGITConfig, rngs: nnx.Rngs):
        dtype, d = jnp.dtype(config.compute_dtype), config.hidden_dim
        self.rate = config.dropout
        self.norm_0 = LayerNorm(d, PREFIX_EPS, dtype)
        self.linear_2 = _linear(d, d, dtype, rngs)
        self.norm_4 = LayerNorm(d, PREFIX_EPS, dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        h = jax.nn.gelu(self.linear_2(dropout(self.norm_0(x), self.rate, key)), approximate=False)
        return self.norm_4(h)


class MaskGIT(nnx.Module):
    """(tokens (B, N) or (B, g, g), labels (B,), drop_label (B,) bool) -> (B, N, codebook_size + 1) float32."""

    def __init__(self, config: MaskGITConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_dim
        self.tok_emb = nnx.Embed(config.vocab_size, d, param_dtype=jnp.float32, rngs=rngs)
        self.pos_emb = nnx.Param(jnp.zeros((1, config.seq_len, d), jnp.float32))
        self.first_layer = FirstLayer(config, rngs)

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs)

        self.blocks = make_blocks(rngs)
        self.last_layer = LastLayer(config, rngs)
        self.bias = nnx.Param(jnp.zeros((config.seq_len, config.vocab_size), jnp.float32))

    def __call__(
        self,
        tokens: jax.Array,
        labels: jax.Array,
        drop_label: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits of every image position; `drop_label` True replaces the class by the dropped-label token.
        Dropout runs only with `dropout_key` (training)."""
        cfg = self.config
        b = tokens.shape[0]
        tokens = tokens.reshape(b, -1).astype(jnp.int32)
        if tokens.shape[1] != cfg.num_tokens:
            raise ValueError(f"expected {cfg.num_tokens} tokens per image, got {tokens.shape[1]}")
        cls = labels.reshape(b).astype(jnp.int32) + cfg.codebook_size + 1
        if drop_label is not None:
            cls = jnp.where(drop_label.reshape(b), cfg.drop_label_id, cls)
        parts = [cls[:, None], tokens] if cfg.class_token_first else [tokens, cls[:, None]]
        table = self.tok_emb.embedding[...]
        x = jnp.take(table, jnp.concatenate(parts, axis=1), axis=0) + self.pos_emb[...]

        k_first, k_blocks, k_last = _split(dropout_key, 3)
        x = self.first_layer(x, k_first)
        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, xs: Any) -> tuple[jax.Array, None]:
            block_state, key = xs
            return nnx.merge(graphdef, block_state)(h, key), None

        if cfg.remat:
            body = jax.checkpoint(body)
        block_keys = None if k_blocks is None else jax.random.split(k_blocks, cfg.depth)
        x, _ = jax.lax.scan(body, x, (state, block_keys))
        h = self.last_layer(x, k_last)

        start = 1 if cfg.class_token_first else 0
        image = h[:, start : start + cfg.num_tokens]
        dtype = jnp.dtype(cfg.compute_dtype)
        logits = jnp.einsum(
            "bnd,vd->bnv", image, table[: cfg.num_logits].astype(dtype), preferred_element_type=jnp.float32
        )
        return logits + self.bias[start : start + cfg.num_tokens, : cfg.num_logits]


# ---------------------------------------------------------------------------------------------------------
# Construction, weights, sharding
# ---------------------------------------------------------------------------------------------------------


def init_values(config: MaskGITConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat {path: float32 array} drawn with numpy like the reference's PyTorch init.

    tok_emb N(0, 1) (nn.Embedding); pos_emb N(0, 0.02) truncated at +-2 (trunc_normal_); `bias` 0; LayerNorm
    1 / 0; attention in_proj xavier-uniform with zero bias and out_proj bias 0 (nn.MultiheadAttention); every
    other Linear U(+-1/sqrt(fan_in)) for weight and bias. Per-layer tensors are drawn independently.
    """
    rng = np.random.default_rng(seed)
    shapes = weights.variable_shapes(abstract(config))
    out: dict[str, np.ndarray] = {}
    for key, shape in sorted(shapes.items()):
        owner, leaf = key.rsplit("/", 1) if "/" in key else ("", key)
        kernel = shapes.get(f"{owner}/kernel")  # set for a Linear's kernel and bias, None for a LayerNorm
        if key == "tok_emb/embedding":
            value = rng.standard_normal(shape)
        elif key == "pos_emb":
            value = np.clip(rng.normal(0.0, 0.02, shape), -2.0, 2.0)
        elif key == "bias" or (leaf == "bias" and owner.endswith(("/in_proj", "/out_proj"))):
            value = np.zeros(shape)
        elif leaf == "kernel" and owner.endswith("/in_proj"):
            bound = math.sqrt(6.0 / (shape[-2] + shape[-1]))
            value = rng.uniform(-bound, bound, shape)
        elif kernel is not None:
            bound = 1.0 / math.sqrt(kernel[-2])
            value = rng.uniform(-bound, bound, shape)
        elif leaf in ("scale", "bias"):
            value = np.full(shape, 1.0 if leaf == "scale" else 0.0)
        else:
            raise ValueError(f"init_values: no rule for {key}")
        out[key] = np.asarray(value, np.float32)
    return out


# build(config=None, *, seed=0) (`init_values`, drawn on the host with numpy: milliseconds, identical on every
# backend), abstract(config=None), load(path, **overrides) (e.g. compute_dtype="bfloat16" or dropout),
# save(model, path): see `models.weights.model_api`.
build, abstract, load, save = weights.model_api(
    KIND, MaskGITConfig, lambda config, rngs: MaskGIT(config, rngs=rngs), random_variables=init_values)


@dataclasses.dataclass(frozen=True)
class FunctionalMaskGIT:
    """The static half of a MaskGIT for pure functions of its params (a plain nested dict,
    `nnx.State.to_pure_dict()`): graph definition, non-Param variables (none today) and the config."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    config: MaskGITConfig

    def apply(self, params: dict[str, Any], tokens: jax.Array, labels: jax.Array,
              drop_label: jax.Array | None = None, **kw: Any) -> jax.Array:
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)(tokens, labels, drop_label, **kw)


def functional(model: MaskGIT) -> tuple[FunctionalMaskGIT, dict[str, Any]]:
    """(static half, params as a plain dict) of `model`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return FunctionalMaskGIT(graphdef, rest, model.config), params.to_pure_dict()
