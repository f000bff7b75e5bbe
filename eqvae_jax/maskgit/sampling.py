"""MaskGIT iterative decoding as valeoai/Maskgit-pytorch v1's `MaskGIT.sample()`, batched and jittable.

Start from all tokens masked; at step i of T (default 8):
  1. logits of the current tokens; with guidance w != 0 the conditional and the dropped-label passes run as
     one batch and combine as (1 + w_i) cond - w_i uncond with w_i = w * i / (T - 1) (0 at the first step,
     w at the last);
  2. probabilities softmax(logits * sm_temp) over the codes AND the mask id (v1 multiplies by its "softmax
     temperature", so sm_temp > 1 sharpens); a token is sampled at every position;
  3. confidence = log p(sampled token) + r_temp * (1 - i / (T - 1)) * Gumbel noise ("linear" randomisation;
     "warm_up" uses uniform noise as the confidence for the first two steps, "random" always, "no" none);
  4. among the still-masked positions, the n_i most confident are revealed with their sampled token; revealed
     tokens never change again.
n_i follows v1's `adap_sche`: r = linspace(1, 0, T), weights schedule(r), counts round(weights / sum * 256),
zeros raised to 1, and the last count absorbs the difference so the counts sum to 256 (arccos, T=8:
1, 18, 26, 32, 38, 43, 48, 50). The final tokens are clipped to the codebook (a sampled mask id becomes
codebook_size - 1, as v1's `torch.clamp` before decoding).

`make_generate` wraps `decode` for a sharded batch of global sample indices (label and trajectory key from
`fold_in(key(seed), index)`, so a seed gives the same images on any device count and batch size) and decodes the
codes with the VQ model to uint8 images; `diffusion.sampling.generate_all` / `write_outputs` run it to an ADM npz.

Differences from v1, none of which changes the distribution: randomness comes from per-sample keys (so a
sample depends only on its key, never on the batch it ran in or the device count), and exactly n_i tokens are
revealed by rank, where v1 thresholds at the n_i-th confidence (ties, which have probability zero with Gumbel
noise, could reveal more in v1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from eqvae_jax.diffusion.sampling import Decoder, as_decoder, bind_decoder, generate_all, sample_keys, to_uint8
from eqvae_jax.images import square_grid
from eqvae_jax.models.maskgit import FunctionalMaskGIT

REVEAL_SCHEDULES = ("arccos", "cosine", "linear", "square", "root")
RANDOMIZE = ("linear", "warm_up", "random", "no")


def reveal_schedule(steps: int, num_tokens: int = 256, mode: str = "arccos") -> tuple[int, ...]:
    """Tokens revealed at each step (v1 `adap_sche`, in float32 like torch); they sum to `num_tokens`."""
    if steps < 2:
        raise ValueError(f"MaskGIT decoding needs at least 2 steps (v1's schedule divides by zero), got {steps}")
    f32 = np.float32
    # torch.linspace(1, 0, steps) in float32: the first half counts up from 1, the second down from 0
    delta = f32(-1.0) / f32(steps - 1)
    i = np.arange(steps)
    r = np.where(i < steps // 2, f32(1.0) + i.astype(f32) * delta, f32(0.0) - (steps - 1 - i).astype(f32) * delta)
    r = r.astype(f32)
    if mode == "root":
        w = f32(1.0) - np.sqrt(r)
    elif mode == "linear":
        w = f32(1.0) - r
    elif mode == "square":
        w = f32(1.0) - r * r
    elif mode == "cosine":
        w = np.cos(r * f32(math.pi * 0.5))
    elif mode == "arccos":
        w = np.arccos(r) / f32(math.pi * 0.5)
    else:
        raise ValueError(f"unknown reveal schedule {mode!r}; one of {', '.join(REVEAL_SCHEDULES)}")
    counts = np.round((w / w.sum(dtype=f32)) * f32(num_tokens)).astype(np.int64)
    counts[counts == 0] = 1
    counts[-1] += num_tokens - counts.sum()
    if counts.min() < 1:
        raise ValueError(
            f"{steps} steps of the {mode} schedule cannot reveal {num_tokens} tokens with at least one per step "
            f"(counts {counts.tolist()})"
        )
    return tuple(int(c) for c in counts)


class Trace(NamedTuple):
    """Per-step state after each of the T steps: tokens (T, B, N) int32 (mask id where still masked, before
    the final clip) and masked (T, B, N) bool."""

    tokens: jax.Array
    masked: jax.Array


LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def decode(
    logits_fn: LogitsFn,
    labels: jax.Array,
    keys: jax.Array,
    *,
    num_tokens: int = 256,
    codebook_size: int = 1024,
    mask_id: int | None = None,
    steps: int = 8,
    schedule: str = "arccos",
    sm_temp: float = 1.0,
    r_temp: float = 4.5,
    cfg_scale: float | jax.Array = 3.0,
    randomize: str = "linear",
    trace: bool = False,
) -> jax.Array | tuple[jax.Array, Trace]:
    """Generate (B, num_tokens) int32 codes in [0, codebook_size) for class `labels` (B,).

    `logits_fn(tokens (B, N), labels (B,), drop_label (B,) bool) -> (B, N, codebook_size + 1)`: a
    `models.maskgit.MaskGIT` works as is (eval mode: no dropout key). `keys` (B,) holds one PRNG key per
    sample, e.g. `fold_in(key(seed), global sample index)`: a sample depends on its key and label only.
    `mask_id` defaults to codebook_size. A Python `cfg_scale` of 0 runs the unguided model alone (v1's w == 0
    branch); any other value, or a traced one, runs both passes. All options but `cfg_scale` are static.
    Under `jax.jit`, pass the weights as an argument (`lambda t, y, d: fn.apply(params, t, y, d)` with
    `models.maskgit.functional`): a closed-over model is baked into the program as constants.
    """
    if randomize not in RANDOMIZE:
        raise ValueError(f"unknown randomize {randomize!r}; one of {', '.join(RANDOMIZE)}")
    mask_id = codebook_size if mask_id is None else mask_id
    counts = np.asarray(reveal_schedule(steps, num_tokens, schedule), np.int32)
    ratio = np.arange(steps, dtype=np.float64) / (steps - 1)
    guided = not (isinstance(cfg_scale, int | float) and cfg_scale == 0)
    b = labels.shape[0]
    labels = labels.astype(jnp.int32)
    keep = jnp.zeros((b,), bool)

    def logits_at(tokens: jax.Array, w: jax.Array) -> jax.Array:
        if not guided:
            return logits_fn(tokens, labels, keep).astype(jnp.float32)
        both = logits_fn(
            jnp.concatenate([tokens, tokens]), jnp.concatenate([labels, labels]), jnp.concatenate([keep, ~keep])
        ).astype(jnp.float32)
        cond, uncond = both[:b], both[b:]
        return (1.0 + w) * cond - w * uncond

    def step(carry: tuple[jax.Array, jax.Array], xs: tuple) -> tuple[tuple[jax.Array, jax.Array], tuple]:
        tokens, masked = carry
        i, count, w, noise_temp = xs
        logp = jax.nn.log_softmax(logits_at(tokens, w) * sm_temp, axis=-1)
        pair = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(keys)
        pred = jax.vmap(lambda k, lp: jax.random.categorical(k, lp, axis=-1))(pair[:, 0], logp)
        conf = jnp.take_along_axis(logp, pred[..., None], axis=-1)[..., 0]
        if randomize == "linear":
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (num_tokens,)))(pair[:, 1])
            conf = conf + noise_temp * gumbel
        elif randomize in ("warm_up", "random"):
            uniform = jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,)))(pair[:, 1])
            conf = uniform if randomize == "random" else jnp.where(i < 2, uniform, conf)
        conf = jnp.where(masked, conf, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
        reveal = (rank < count) & masked
        tokens = jnp.where(reveal, pred.astype(jnp.int32), tokens)
        masked = masked & ~reveal
        return (tokens, masked), ((tokens, masked) if trace else ())

    start = (jnp.full((b, num_tokens), mask_id, jnp.int32), jnp.ones((b, num_tokens), bool))
    xs = (
        jnp.arange(steps, dtype=jnp.int32),
        jnp.asarray(counts),
        jnp.asarray(ratio, jnp.float32) * cfg_scale,
        jnp.asarray(r_temp * (1.0 - ratio), jnp.float32),
    )
    (tokens, _), history = jax.lax.scan(step, start, xs)
    codes = jnp.clip(tokens, 0, codebook_size - 1)
    return (codes, Trace(*history)) if trace else codes


def make_code_decoder(vq: nnx.Module) -> Decoder:
    """(B, h, w) code indices -> images in [-1, 1] scale with a `models.vq_vae.VQVAE`, its weights as the
    decoder's variables (`diffusion.sampling.Decoder`: an argument of the jitted sampler, not constants)."""
    graphdef, state = nnx.split(vq)
    return Decoder(lambda weights, codes: nnx.merge(graphdef, weights).decode_indices(codes), state)


def make_generate(
    model: FunctionalMaskGIT,
    decode_codes: Callable[[jax.Array], jax.Array] | Decoder | None,
    mesh: Mesh,
    *,
    steps: int = 8,
    schedule: str = "arccos",
    sm_temp: float = 1.0,
    r_temp: float = 4.5,
    cfg_scale: float = 3.0,
    randomize: str = "linear",
    class_labels: str = "random",
) -> Callable[[dict, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """jit (params, seed, indices (B,) sharded) -> (uint8 images, or (B, g, g) int32 codes without
    `decode_codes`; labels), sharded over the batch. Sample i draws its label and its decoding keys from
    `diffusion.sampling.sample_keys(seed, i)`. `class_labels`: 'random' (uniform) or 'cycle' (i % classes)."""
    cfg = model.config
    g = cfg.grid_size
    decoder = as_decoder(decode_codes)

    def generate(decoder_vars: Any, params: dict, seed: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_label, k_traj = sample_keys(seed, indices)
        if class_labels == "cycle":
            labels = (indices % cfg.num_classes).astype(jnp.int32)
        else:
            labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, cfg.num_classes))(k_label)
        codes = decode(lambda t, y, d: model.apply(params, t, y, d), labels, k_traj, num_tokens=cfg.num_tokens,
                       codebook_size=cfg.codebook_size, mask_id=cfg.mask_id, steps=steps, schedule=schedule,
                       sm_temp=sm_temp, r_temp=r_temp, cfg_scale=cfg_scale, randomize=randomize)
        codes = codes.reshape(-1, g, g)
        return (to_uint8(decoder.apply(decoder_vars, codes)) if decoder is not None else codes), labels

    return bind_decoder(generate, decoder, mesh)


def grid_sampler(model: FunctionalMaskGIT, decode_codes: Callable[[jax.Array], jax.Array], mesh: Mesh, count: int,
                 seed: int, **kw: Any) -> Callable[[dict], np.ndarray]:
    """params -> a uint8 grid of `count` decoded samples with a fixed seed and balanced labels (comparable over
    training); `kw` are `make_generate`'s decoding options."""
    generate = make_generate(model, decode_codes, mesh, class_labels="cycle", **kw)
    shards = int(np.prod(list(mesh.shape.values())))
    batch = -(-count // shards) * shards
    return lambda params: square_grid(generate_all(generate, params, seed, count, batch, mesh)[0], count)
