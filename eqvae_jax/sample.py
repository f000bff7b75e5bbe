"""Class-conditional samples from a DiT/SiT run's EMA weights, decoded by the VAE: PNG grid + ADM-layout npz.

    python -m eqvae_jax.sample --workdir=DIR [--num_samples=50000] [--sampler=ddpm] [--num_steps=250]
        [--cfg_scale=1.0] [--seed=0] [--step=N] [--config=configs/dit_b2.py]

Writes DIR/samples/<name>.npz with `arr_0` (N, H, W, 3) uint8 (the ADM evaluator's input; `labels` beside it)
and <name>.png, a grid of the first samples. Decoding follows the reference's `custom_to_pil`: the latent is
divided by the scaling factor, decoded, clamped to [-1, 1] and (x + 1) / 2 * 255 truncated to uint8.

Determinism: sample i uses fold_in(key(seed), i) for its label, initial noise and every sampler step (the
samplers are vmapped over single samples), so a seed gives the same images whatever the device count and
batch size. Samples are sharded over all devices (and hosts) along the batch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqvae_jax.diffusion import ddpm_sampling, flow_sampling, guidance
from eqvae_jax.diffusion.schedule import create_schedule
from eqvae_jax.parallel import distributed
from eqvae_jax.train.dit_state import Model
from eqvae_jax.train.dit_steps import var_type_of

SAMPLERS = ("ddpm", "ddim", "ode", "sde")


def make_sampler(
    model: Model,
    sampler: str,
    num_steps: int,
    cfg_scale: float = 1.0,
    guide_channels: int = 0,
    ode_method: str = "heun",
) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
    """fn(params, labels (B,), keys (B,)) -> latents (B, h, w, c), one independent trajectory per sample.

    'ddpm'/'ddim' run DiT's respaced `num_steps`-step schedule (clip_denoised=False); 'ode'/'sde' integrate
    SiT's linear path with `num_steps` grid points. cfg_scale == 1 runs the conditional model alone
    (the reference only guides for scale > 1).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cfg = model.config
    shape = (1, cfg.input_size, cfg.input_size, cfg.in_channels)
    sched = create_schedule(str(num_steps)) if sampler in ("ddpm", "ddim") else None
    var_type = var_type_of(cfg)
    if cfg_scale != 1.0 and cfg.class_dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (null class)")

    def one(params: dict, label: jax.Array, key: jax.Array) -> jax.Array:
        k_init, k_loop = jax.random.split(key)
        x = jax.random.normal(k_init, shape, jnp.float32)
        apply = lambda x, t, y: model.apply(params, x, t, y)
        y = label[None]
        if cfg_scale != 1.0:
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


def sample_keys(seed: int, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample (label key, trajectory key) from the global sample index: independent of the batching."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    pair = jax.vmap(jax.random.split)(keys)
    return pair[:, 0], pair[:, 1]


def make_generate(
    model: Model,
    decode: Callable[[jax.Array], jax.Array] | None,
    mesh: Mesh,
    sampler: str,
    num_steps: int,
    cfg_scale: float = 1.0,
    guide_channels: int = 0,
    ode_method: str = "heun",
    class_labels: str = "random",
) -> Callable[[dict, int, jax.Array], tuple[jax.Array, jax.Array]]:
    """jit (params, seed, indices (B,) sharded) -> (uint8 images or latents, labels), sharded over the batch.

    `decode(latents)` maps diffusion latents to images in [-1, 1] (None returns the latents, float32).
    `class_labels`: 'random' (uniform, like the reference) or 'cycle' (index % num_classes, balanced).
    """
    sample = make_sampler(model, sampler, num_steps, cfg_scale, guide_channels, ode_method)
    num_classes = model.config.num_classes

    def generate(params: dict, seed: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_label, k_traj = sample_keys(seed, indices)
        if class_labels == "cycle":
            labels = (indices % num_classes).astype(jnp.int32)
        else:
            labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(k_label)
        z = sample(params, labels, k_traj)
        return (to_uint8(decode(z)) if decode is not None else z), labels

    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return jax.jit(generate, in_shardings=(None, None, batch), out_shardings=(batch, batch))


def generate_all(
    generate: Callable, params: dict, seed: int, num_samples: int, batch_size: int, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """All `num_samples` samples on the host (every process gets them), in global-batch steps; the last
    batch is padded with extra indices whose samples are dropped."""
    from jax.experimental import multihost_utils

    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    outs, labels = [], []
    for start in range(0, num_samples, batch_size):
        idx = np.arange(start, start + batch_size, dtype=np.int32)
        local = idx[_local_rows(sharding, batch_size)]
        indices = jax.make_array_from_process_local_data(sharding, local, (batch_size,))
        images, y = generate(params, jnp.asarray(seed, jnp.uint32), indices)
        if jax.process_count() > 1:
            images, y = multihost_utils.process_allgather((images, y), tiled=True)
        outs.append(np.asarray(images))
        labels.append(np.asarray(y))
    return np.concatenate(outs)[:num_samples], np.concatenate(labels)[:num_samples]


def _local_rows(sharding: NamedSharding, batch: int) -> np.ndarray:
    """Rows of a global batch held by this process's devices (contiguous, in device order)."""
    index_map = sharding.addressable_devices_indices_map((batch,))
    rows = sorted({r for sl in index_map.values() for r in range(*sl[0].indices(batch))})
    return np.asarray(rows, np.int64)


def image_grid(images: np.ndarray, max_images: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid image of the first `max_images`."""
    images = images[:max_images]
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid


def write_outputs(out_dir: str, name: str, images: np.ndarray, labels: np.ndarray, grid: int = 64) -> str:
    """Write NAME.npz (arr_0 uint8 NHWC, labels) atomically and NAME.png (a grid); returns the npz path."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.npz")
    tmp = os.path.join(out_dir, f".{name}.tmp{os.getpid()}.npz")
    np.savez(tmp, arr_0=images, labels=labels)
    os.replace(tmp, path)
    Image.fromarray(image_grid(images, grid)).save(os.path.join(out_dir, f"{name}.png"))
    return path


def make_decoder(vae: Any, scale: float, shift: float) -> Callable[[jax.Array], jax.Array]:
    """Diffusion latents -> images: decode(z / scale + shift) (the VAE's weights are closed over)."""
    from flax import nnx

    graphdef, state = nnx.split(vae)
    return lambda z: nnx.merge(graphdef, state).decode(z / scale + shift)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def define_flags() -> Any:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Job config file instead of WORKDIR/config.json.")
    flags.DEFINE_string("workdir", None, "A DiT/SiT training workdir (checkpoints + config.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("num_samples", 64, "How many images.")
    flags.DEFINE_integer("batch_size", 0, "Global samples per call (default: 8 per device).")
    flags.DEFINE_string("sampler", None, "ddpm | ddim (DiT), ode | sde (SiT); default config.sample.sampler.")
    flags.DEFINE_integer("num_steps", None, "Sampling steps (default config.sample.num_steps, 250).")
    flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_integer("guide_channels", None, "Guided channels (0 = all; 3 = the reference quirk).")
    flags.DEFINE_integer("seed", None, "Sampling seed.")
    flags.DEFINE_enum("labels", "random", ["random", "cycle"], "Class labels: uniform random or i % classes.")
    flags.DEFINE_string("vae", None, "VAE weights dir for decoding (default: the VAE of the latent cache).")
    flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
    flags.DEFINE_string("name", None, "Output file stem (default derived from the settings).")
    flags.DEFINE_bool("distributed", None, "Force/prevent jax.distributed.initialize() (default: auto-detect).")
    flags.mark_flag_as_required("workdir")
    return flags.FLAGS


OVERRIDES = ("step", "num_samples", "batch_size", "sampler", "num_steps", "cfg_scale", "guide_channels", "seed",
             "labels", "vae", "out", "name")


def run_sampling(config: Any, workdir: str, overrides: dict[str, Any]) -> str:
    """Restore the EMA weights of `workdir`, sample, decode and write the outputs; returns the npz path."""
    from ml_collections import ConfigDict

    from eqvae_jax.parallel.mesh import make_mesh
    from eqvae_jax.train import dit_config, dit_state, latent_config
    from eqvae_jax.train.checkpointing import Checkpointer
    from eqvae_jax.train.dit_trainer import read_items

    config = ConfigDict(config)
    s = config.sample
    sampler = overrides.get("sampler") or dit_config.sampler_name(config)
    num_steps = overrides.get("num_steps") or s.num_steps
    cfg_scale = overrides["cfg_scale"] if overrides.get("cfg_scale") is not None else s.cfg_scale
    guide = overrides["guide_channels"] if overrides.get("guide_channels") is not None else s.guide_channels
    seed = overrides["seed"] if overrides.get("seed") is not None else s.seed

    mesh = make_mesh(-1, 1)
    ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"))
    step = overrides.get("step") or ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    host = read_items(ckpt.directory, step, ("host",))["host"]
    cfg = dit_config.dit_model_config(config, tuple(host["latent_shape"]))
    model, target = dit_state.create_abstract(cfg, config, mesh)
    restored = ckpt.restore(step, target)
    ckpt.close()
    params = restored.state.ema

    spec = dict(host["vae"])
    vae_path = overrides.get("vae") or s.vae
    if vae_path:
        spec = {**spec, "init": "weights", "weights": vae_path}
    vae = latent_config.load_vae(spec)
    decode = make_decoder(vae, host["scaling_factor"], host["shift_factor"])
    batch = overrides.get("batch_size") or 8 * jax.device_count()
    generate = make_generate(model, decode, mesh, sampler, num_steps, cfg_scale, guide, s.ode_method,
                             overrides.get("labels", "random"))
    images, labels = generate_all(generate, params, seed, overrides.get("num_samples", 64), batch, mesh)
    name = overrides.get("name") or f"step{step}-{sampler}{num_steps}-cfg{cfg_scale:g}-seed{seed}-n{len(images)}"
    out_dir = overrides.get("out") or os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        path = write_outputs(out_dir, name, images, labels)
    else:
        path = os.path.join(out_dir, f"{name}.npz")
    return path


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    distributed.maybe_initialize(f.distributed)
    config = f.config
    if config is None:
        with open(os.path.join(f.workdir, "config.json")) as fh:
            config = json.load(fh)
    path = run_sampling(config, f.workdir, {n: getattr(f, n) for n in OVERRIDES})
    logging.info("samples written to %s", path)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
