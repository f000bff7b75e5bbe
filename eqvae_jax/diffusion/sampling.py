"""Class-conditional sampling of a DiT/SiT, decoding with the VAE, and the ADM-evaluator sample file.

    sample = make_sampler(model, "ddpm", 250, cfg_scale=1.0)          # (params, labels, keys) -> latents
    generate = make_generate(model, decode, mesh, "ddpm", 250)        # jit over a sharded batch of indices
    images, labels = generate_all(generate, params, seed, 50_000, batch, mesh)
    write_outputs(out_dir, name, images, labels)                      # NAME.npz (arr_0 uint8 NHWC) + NAME.png

Determinism: sample i uses fold_in(key(seed), i) for its label, initial noise and every sampler step (the
samplers are vmapped over single samples), so a seed gives the same images whatever the device count and
batch size. Decoding follows the reference's `custom_to_pil`: the latent is mapped back with the VAE's
scale/shift, decoded, clamped to [-1, 1] and (x + 1) / 2 * 255 truncated to uint8. The decoder's weights and
factors are arguments of the jitted sampler (`Decoder`), not closed over: JAX compiles closed-over arrays in as
constants (the whole VAE decoder inside the program, and a new program for every set of weights).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from eqvae_jax import storage
from eqvae_jax.diffusion import ddpm_sampling, flow_sampling, gaussian, guidance
from eqvae_jax.diffusion.schedule import create_schedule
from eqvae_jax.images import square_grid
from eqvae_jax.models.dit import FunctionalDiT
from eqvae_jax.models.kl_vae import denormalize_latents
from eqvae_jax.parallel.mesh import batch_sharding, local_rows

SAMPLERS = ("ddpm", "ddim", "ode", "sde")
FLOW_SAMPLERS = ("ode", "sde")  # SiT's: the ones a guidance interval applies to


def make_sampler(
    model: FunctionalDiT,
    sampler: str,
    num_steps: int,
    cfg_scale: float = 1.0,
    guide_channels: int = 0,
    ode_method: str = "heun",
    guidance_interval: tuple[float, float] = guidance.FULL_INTERVAL,
) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
    """fn(params, labels (B,), keys (B,)) -> latents (B, h, w, c), one independent trajectory per sample.

    'ddpm'/'ddim' run DiT's respaced `num_steps`-step schedule (clip_denoised=False); 'ode'/'sde' integrate
    SiT's linear path with `num_steps` grid points. cfg_scale == 1 runs the conditional model alone
    (the reference only guides for scale > 1). `guidance_interval` (ode/sde only): guide only the steps whose
    start lies in [low, high] of REPA's time (1 = noise, 0 = data; `guidance` module docstring).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    interval = (float(guidance_interval[0]), float(guidance_interval[1]))
    if interval != guidance.FULL_INTERVAL and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"a guidance interval {interval} needs a flow sampler {FLOW_SAMPLERS} (REPA's time); "
                         f"{sampler!r} guides every step")
    cfg = model.config
    shape = (1, cfg.input_size, cfg.input_size, cfg.in_channels)
    sched = create_schedule(str(num_steps)) if sampler in ("ddpm", "ddim") else None
    var_type = gaussian.var_type_for(cfg.learn_sigma)
    if cfg_scale != 1.0 and cfg.class_dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (null class)")

    def one(params: dict, label: jax.Array, key: jax.Array) -> jax.Array:
        k_init, k_loop = jax.random.split(key)
        x = jax.random.normal(k_init, shape, jnp.float32)
        apply = lambda x, t, y: model.apply(params, x, t, y)
        y = label[None]
        if cfg_scale != 1.0 and interval != guidance.FULL_INTERVAL:
            fn = guidance.interval_cfg_model_fn(apply, y, cfg.num_classes, cfg_scale, cfg.in_channels, interval,
                                                guide_channels or None)
        elif cfg_scale != 1.0:
            fn = guidance.cfg_model_fn(apply, y, cfg.num_classes, cfg_scale, cfg.in_channels, guide_channels or None)
        else:
            fn = guidance.conditional_model_fn(apply, y)
        if sampler == "ddpm":
            out = ddpm_sampling.ddpm_sample(sched, fn, x, k_loop, var_type)
        elif sampler == "ddim":
            out = ddpm_sampling.ddim_sample(sched, fn, x, k_loop, 0.0, var_type)
        elif sampler == "ode":
            out = flow_sampling.ode_sample(fn, x, num_steps, ode_method)
        else:
            out = flow_sampling.sde_sample(fn, x, k_loop, num_steps)
        return out[0]

    return jax.vmap(one, in_axes=(None, 0, 0))


def to_uint8(images: jax.Array) -> jax.Array:
    """The reference `custom_to_pil`: clamp to [-1, 1], (x + 1) / 2 * 255, truncated to uint8."""
    return ((jnp.clip(images, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(jnp.uint8)


def sample_keys(seed: int | jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample (label key, trajectory key) from the global sample index: independent of the batching."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    pair = jax.vmap(jax.random.split)(keys)
    return pair[:, 0], pair[:, 1]


@dataclasses.dataclass(frozen=True)
class Decoder:
    """`apply(variables, x)` with the arrays it reads (an autoencoder's weights, latent factors) kept apart, so a
    jitted sampler takes them as an argument: closed over, they would be compiled in as constants (a VAE
    decoder's weights inside the program, and one program per set of weights). Callable as `decoder(x)`."""

    apply: Callable[[Any, jax.Array], jax.Array]
    variables: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply(self.variables, x)


def as_decoder(decode: Callable[[jax.Array], jax.Array] | Decoder | None) -> Decoder | None:
    """A `Decoder` for any decode function (a plain function has no arrays of its own)."""
    if decode is None or isinstance(decode, Decoder):
        return decode
    return Decoder(lambda _, x: decode(x), None)


def make_decoder(vae: nnx.Module, scale: float, shift: float) -> Decoder:
    """Diffusion latents -> images in [-1, 1] scale: decode(denormalize(z)), the VAE's weights and the factors
    as the decoder's variables."""
    graphdef, state = nnx.split(vae)

    def apply(variables: tuple[Any, jax.Array, jax.Array], z: jax.Array) -> jax.Array:
        weights, s, t = variables
        return nnx.merge(graphdef, weights).decode(denormalize_latents(z, s, t))

    return Decoder(apply, (state, jnp.float32(scale), jnp.float32(shift)))


def make_generate(
    model: FunctionalDiT,
    decode: Callable[[jax.Array], jax.Array] | Decoder | None,
    mesh: Mesh,
    sampler: str,
    num_steps: int,
    cfg_scale: float = 1.0,
    guide_channels: int = 0,
    ode_method: str = "heun",
    class_labels: str = "random",
    guidance_interval: tuple[float, float] = guidance.FULL_INTERVAL,
) -> Callable[[dict, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(params, seed, indices (B,) sharded) -> (uint8 images or latents, labels), sharded over the batch: one
    jitted program, the decoder's variables passed to it as an argument.

    `decode(latents)` maps diffusion latents to images in [-1, 1] (None returns the latents, float32).
    `class_labels`: 'random' (uniform, like the reference) or 'cycle' (index % num_classes, balanced).
    """
    sample = make_sampler(model, sampler, num_steps, cfg_scale, guide_channels, ode_method, guidance_interval)
    num_classes = model.config.num_classes

    decoder = as_decoder(decode)

    def generate(decoder_vars: Any, params: dict, seed: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_label, k_traj = sample_keys(seed, indices)
        if class_labels == "cycle":
            labels = (indices % num_classes).astype(jnp.int32)
        else:
            labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(k_label)
        z = sample(params, labels, k_traj)
        return (to_uint8(decoder.apply(decoder_vars, z)) if decoder is not None else z), labels

    return bind_decoder(generate, decoder, mesh)


def bind_decoder(generate: Callable, decoder: Decoder | None, mesh: Mesh) -> functools.partial:
    """jit `generate(decoder_vars, params, seed, indices)` over a sharded batch and bind the decoder's variables:
    `(params, seed, indices) -> ...`, the jitted function itself at `.func`."""
    batch = batch_sharding(mesh)
    jitted = jax.jit(generate, in_shardings=(None, None, None, batch), out_shardings=(batch, batch))
    return functools.partial(jitted, decoder.variables if decoder is not None else None)


def generate_all(
    generate: Callable, params: dict, seed: int, num_samples: int, batch_size: int, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """All `num_samples` samples on the host (every process gets them), in global-batch steps; the last
    batch is padded with extra indices whose samples are dropped."""
    sharding = batch_sharding(mesh)
    outs, labels = [], []
    for start in range(0, num_samples, batch_size):
        idx = np.arange(start, start + batch_size, dtype=np.int32)
        local = idx[local_rows(sharding, batch_size)]
        indices = jax.make_array_from_process_local_data(sharding, local, (batch_size,))
        images, y = generate(params, jnp.asarray(seed, jnp.uint32), indices)
        if jax.process_count() > 1:
            images, y = multihost_utils.process_allgather((images, y), tiled=True)
        outs.append(np.asarray(images))
        labels.append(np.asarray(y))
    return np.concatenate(outs)[:num_samples], np.concatenate(labels)[:num_samples]


def write_outputs(out_dir: str, name: str, images: np.ndarray, labels: np.ndarray, grid: int = 64) -> str:
    """Write NAME.npz (arr_0 uint8 NHWC, labels) atomically and NAME.png (a grid); returns the npz path."""
    path = os.path.join(out_dir, f"{name}.npz")  # local or gs://
    with storage.atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, arr_0=images, labels=labels)
    with storage.atomic_file(os.path.join(out_dir, f"{name}.png"), suffix=".png") as tmp:
        Image.fromarray(square_grid(images, grid)).save(tmp)
    return path


def grid_sampler(model: FunctionalDiT, decode: Callable[[jax.Array], jax.Array], mesh: Mesh, sampler: str,
                 num_steps: int, count: int, seed: int, **kw: Any) -> Callable[[dict], np.ndarray]:
    """params -> a uint8 grid of `count` samples with fixed seed and balanced labels (comparable over time)."""
    generate = make_generate(model, decode, mesh, sampler, num_steps, class_labels="cycle", **kw)
    shards = int(np.prod(list(mesh.shape.values())))
    batch = -(-count // shards) * shards
    return lambda params: square_grid(generate_all(generate, params, seed, count, batch, mesh)[0], count)


def sample_labels(model: FunctionalDiT, params: dict, decode: Callable[[jax.Array], jax.Array] | Decoder, labels: Any,
                  seed: int = 0, sampler: str = "ddpm", num_steps: int = 250, cfg_scale: float = 1.0,
                  **kw: Any) -> np.ndarray:
    """uint8 (N, H, W, 3) samples of the given class labels, one jitted call on the default device (a sample
    sheet of chosen classes, e.g. in a notebook). Sample i uses the trajectory key of index i (`sample_keys`)."""
    labels = np.asarray(labels, np.int32).reshape(-1)
    bad = labels[(labels < 0) | (labels >= model.config.num_classes)]
    if bad.size:
        raise ValueError(f"class labels {sorted(set(bad.tolist()))} are outside [0, {model.config.num_classes}).")
    sample = make_sampler(model, sampler, num_steps, cfg_scale, **kw)
    decoder = as_decoder(decode)

    def run(params: dict, decoder_vars: Any, labels: jax.Array) -> jax.Array:
        _, keys = sample_keys(seed, jnp.arange(labels.shape[0]))
        return to_uint8(decoder.apply(decoder_vars, sample(params, labels, keys)))

    return np.asarray(jax.jit(run)(params, decoder.variables, jnp.asarray(labels)))
