"""Class-conditional samples from a DiT/SiT run's EMA weights, decoded by the VAE: PNG grid + ADM-layout npz.

    python -m eqvae_jax.sample --workdir=DIR [--num_samples=50000] [--sampler=ddpm] [--num_steps=250]
        [--cfg_scale=1.0] [--seed=0] [--update=N]

Writes DIR/samples/<name>.npz with `arr_0` (N, H, W, 3) uint8 (the ADM evaluator's input; `labels` beside it)
and <name>.png, a grid of the first samples; the npz goes straight into `python -m eqvae_jax.evaluate`.
The run's config comes from its checkpoint (`--config` overrides). Samples are sharded over all devices
(and hosts); a seed gives the same images whatever the device count (eqvae_jax/diffusion/sampling.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from eqvae_jax.diffusion import sampling
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.distributed import maybe_initialize
from eqvae_jax.parallel.mesh import make_mesh, replicated
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.console import setup_logging
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import parse_config
from eqvae_jax.train.dit.job import cache_autoencoder
from eqvae_jax.train.services import resolve
from eqvae_jax.typed_config import ConfigError

OVERRIDES = ("update", "num_samples", "batch_size", "sampler", "num_steps", "cfg_scale", "guide_channels", "seed",
             "labels", "vae", "out", "name")


def define_flags() -> Any:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Job config file instead of the run's own config.")
    flags.DEFINE_string("workdir", None, "A DiT/SiT training workdir (checkpoints + config.json).")
    flags.DEFINE_integer("update", None, "Checkpoint (optimizer update) to sample from (default: the latest).")
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


def run_sampling(workdir: str, overrides: dict[str, Any], config: ConfigDict | None = None) -> str:
    """Restore the EMA weights of `workdir`, sample, decode and write the outputs; returns the npz path."""
    workdir = resolve(workdir)
    ckpt = Checkpointer(f"{workdir}/checkpoints")
    try:
        update = overrides.get("update") or ckpt.latest_step()
        if update is None:
            raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
        saved = ckpt.read_json(update, ("host", "config"))
        c = parse_config(config if config is not None else ConfigDict(saved["config"]), check_cache=False)
        host = saved["host"]
        cfg = c.dit_config(tuple(host["latent_shape"]))
        mesh = make_mesh(-1, 1)
        tx = dit_state.make_optimizer(c.optim)
        target = dit_state.abstract_state(cfg, c.seed, tx, mesh, c.fsdp_min_size)
        params = ckpt.restore(update, target).state.ema
        model = dit_state.functional_model(cfg, c.seed, replicated(mesh))
    finally:
        ckpt.close()

    def pick(name: str, default: Any) -> Any:
        return overrides[name] if overrides.get(name) is not None else default

    sampler, num_steps = pick("sampler", c.sampler), pick("num_steps", c.sample.num_steps)
    cfg_scale, seed = pick("cfg_scale", c.sample.cfg_scale), pick("seed", c.sample.seed)
    vae = build_autoencoder(cache_autoencoder(host, overrides.get("vae") or c.sample.vae))
    decode = sampling.make_decoder(vae, host["scaling_factor"], host["shift_factor"])
    generate = sampling.make_generate(model, decode, mesh, sampler, num_steps, cfg_scale,
                                      pick("guide_channels", c.sample.guide_channels), c.sample.ode_method,
                                      overrides.get("labels") or "random")
    batch = overrides.get("batch_size") or 8 * jax.device_count()
    images, labels = sampling.generate_all(generate, params, seed, overrides.get("num_samples") or 64, batch, mesh)
    name = overrides.get("name") or f"update{update}-{sampler}{num_steps}-cfg{cfg_scale:g}-seed{seed}-n{len(images)}"
    out_dir = overrides.get("out") or os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        return sampling.write_outputs(out_dir, name, images, labels)
    return os.path.join(out_dir, f"{name}.npz")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    f = flags.FLAGS
    maybe_initialize(f.distributed)
    try:
        path = run_sampling(f.workdir, {n: getattr(f, n) for n in OVERRIDES}, f.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"samples written to {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
