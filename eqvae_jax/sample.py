"""Class-conditional samples from a DiT/SiT or MaskGIT run, decoded by its autoencoder: PNG grid + ADM npz.

    python -m eqvae_jax.sample --workdir=DIR [--num_samples=50000] [--sampler=ddpm] [--num_steps=250]
        [--cfg_scale=1.0] [--guidance_low=0] [--guidance_high=1] [--seed=0] [--update=N]
    python -m eqvae_jax.sample --workdir=MASKGIT_DIR [--num_steps=8] [--cfg_scale=3] [--r_temp=4.5] [--sm_temp=1]

The run's config (from its checkpoint; `--config` overrides) names its trainer. DiT/SiT: the EMA weights,
`--sampler` and `--num_steps` of the diffusion, decoded by the latent cache's VAE; with `--cfg_scale` != 1 the SiT
samplers guide only inside [--guidance_low, --guidance_high] of REPA's time (1 = noise; REPA's README: cfg 1.8,
high 0.7). MaskGIT: the EMA weights when
the run keeps them (else the weights), T = `--num_steps` decoding steps (default the run's sample.steps, 8) with
the arccos reveal schedule, Gumbel confidence noise r_temp * (1 - i / (T - 1)) and CFG w ramped linearly,
decoded by the token cache's VQ model (`--vae` another VQ weights dir).
Writes DIR/samples/<name>.npz with `arr_0` (N, H, W, 3) uint8 (the ADM evaluator's input; `labels` beside it)
and <name>.png, a grid of the first samples; the npz goes straight into `python -m eqvae_jax.eval_samples`.
Samples are sharded over all devices (and hosts); a seed gives the same images whatever the device count
(eqvae_jax/diffusion/sampling.py, eqvae_jax/maskgit/sampling.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from absl import flags
from ml_collections import ConfigDict, config_flags

from eqvae_jax import cli, host_malloc
from eqvae_jax.diffusion import guidance, sampling
from eqvae_jax.maskgit import sampling as maskgit_sampling
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.coordination import failures_shared
from eqvae_jax.parallel.distributed import maybe_initialize
from eqvae_jax.parallel.mesh import make_mesh, replicated
from eqvae_jax.storage import resolve
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.console import setup_logging
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import guidance_problems, parse_config
from eqvae_jax.train.dit.job import cache_autoencoder
from eqvae_jax.train.maskgit import job as maskgit_job
from eqvae_jax.train.maskgit import state as maskgit_state
from eqvae_jax.train.maskgit.config import parse_config as parse_maskgit_config
from eqvae_jax.typed_config import ConfigError

OVERRIDES = ("update", "num_samples", "batch_size", "sampler", "num_steps", "cfg_scale", "guide_channels", "seed",
             "labels", "vae", "out", "name", "r_temp", "sm_temp", "guidance_low", "guidance_high")
DIFFUSION_ONLY = ("sampler", "guide_channels", "guidance_low", "guidance_high")


def define_flags() -> Any:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Job config file instead of the run's own config.")
    flags.DEFINE_string("workdir", None, "A DiT/SiT or MaskGIT training workdir (checkpoints + config.json).")
    flags.DEFINE_integer("update", None, "Checkpoint (optimizer update) to sample from (default: the latest).")
    flags.DEFINE_integer("num_samples", 64, "How many images.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 0, "Global samples per call (default: 8 per device).", lower_bound=0)
    flags.DEFINE_string("sampler", None, "ddpm | ddim (DiT), ode | sde (SiT); default config.sample.sampler.")
    flags.DEFINE_integer("num_steps", None, "Sampling steps (default the run's: DiT 250, MaskGIT 8).", lower_bound=1)
    flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (DiT: 1 = none; MaskGIT: w, 0 = none).")
    flags.DEFINE_integer("guide_channels", None, "Guided channels (0 = all; 3 = the reference quirk).")
    flags.DEFINE_float("guidance_low", None, "SiT: guide only from this noise level tau (REPA's time, 1 = noise).")
    flags.DEFINE_float("guidance_high", None, "SiT: guide only up to this noise level tau (REPA's README: 0.7).")
    flags.DEFINE_integer("seed", None, "Sampling seed.")
    flags.DEFINE_enum("labels", "random", ["random", "cycle"], "Class labels: uniform random or i % classes.")
    flags.DEFINE_string("vae", None, "Autoencoder weights dir for decoding (default: the one of the run's cache).")
    flags.DEFINE_float("r_temp", None, "MaskGIT: Gumbel noise temperature on the confidences (default 4.5).")
    flags.DEFINE_float("sm_temp", None, "MaskGIT: factor on the logits before the softmax (default 1).")
    flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
    flags.DEFINE_string("name", None, "Output file stem (default derived from the settings).")
    flags.DEFINE_bool("distributed", None, "Force/prevent jax.distributed.initialize() (default: auto-detect).")
    flags.mark_flag_as_required("workdir")
    return flags.FLAGS


def run_sampling(workdir: str, overrides: dict[str, Any], config: ConfigDict | None = None) -> str:
    """Restore the sampling weights of `workdir`, sample, decode and write the outputs; returns the npz path."""
    workdir = resolve(workdir)
    ckpt = Checkpointer(f"{workdir}/checkpoints")
    try:
        update, saved = ckpt.read_run(overrides.get("update"))
        raw = config if config is not None else ConfigDict(saved["config"])
        restore = _restore_maskgit if raw.get("trainer") == "maskgit" else _restore_dit
        mesh = make_mesh(-1, 1)
        generate, params, label, seed = restore(ckpt, update, raw, saved["host"], overrides, mesh)
    finally:
        ckpt.close()
    seed = _pick(overrides, "seed", seed)
    batch = overrides.get("batch_size") or 8 * jax.device_count()
    images, labels = sampling.generate_all(generate, params, seed, overrides.get("num_samples") or 64, batch, mesh)
    name = overrides.get("name") or f"update{update}-{label}-seed{seed}-n{len(images)}"
    out_dir = overrides.get("out") or os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        return sampling.write_outputs(out_dir, name, images, labels)
    return os.path.join(out_dir, f"{name}.npz")


def _pick(overrides: dict[str, Any], name: str, default: Any) -> Any:
    return overrides[name] if overrides.get(name) is not None else default


def _restore_dit(ckpt: Checkpointer, update: int, raw: ConfigDict, host: dict[str, Any], overrides: dict[str, Any],
                 mesh: Any) -> tuple[Any, Any, str, int]:
    """(generate, EMA params, name label, default seed) of a DiT/SiT run."""
    c = parse_config(raw, check_cache=False)
    cfg = c.dit_config(tuple(host["latent_shape"]))
    tx = dit_state.make_optimizer(c.optim)
    target = dit_state.abstract_state(cfg, c.seed, tx, mesh, c.fsdp_min_size)
    params = ckpt.restore(update, target).state.ema
    model = dit_state.functional_model(cfg, c.seed, replicated(mesh))
    sampler, num_steps = _pick(overrides, "sampler", c.sampler), _pick(overrides, "num_steps", c.sample.num_steps)
    cfg_scale = _pick(overrides, "cfg_scale", c.sample.cfg_scale)
    interval = (_pick(overrides, "guidance_low", c.sample.guidance_low),
                _pick(overrides, "guidance_high", c.sample.guidance_high))
    problems = guidance_problems(sampler, interval, "--")
    if problems:
        raise ConfigError(problems)
    vae = build_autoencoder(cache_autoencoder(host, overrides.get("vae") or c.sample.vae))
    decode = sampling.make_decoder(vae, host["scaling_factor"], host["shift_factor"])
    generate = sampling.make_generate(model, decode, mesh, sampler, num_steps, cfg_scale,
                                      _pick(overrides, "guide_channels", c.sample.guide_channels), c.sample.ode_method,
                                      overrides.get("labels") or "random", guidance_interval=interval)
    label = f"{sampler}{num_steps}-cfg{cfg_scale:g}"
    if cfg_scale != 1.0 and interval != guidance.FULL_INTERVAL:
        label += f"-interval{interval[0]:g}-{interval[1]:g}"
    return generate, params, label, c.sample.seed


def _restore_maskgit(ckpt: Checkpointer, update: int, raw: ConfigDict, host: dict[str, Any],
                     overrides: dict[str, Any], mesh: Any) -> tuple[Any, Any, str, int]:
    """(generate, EMA params if the run keeps them else params, name label, default seed) of a MaskGIT run."""
    given = [n for n in DIFFUSION_ONLY if overrides.get(n) is not None]
    if given:
        raise ConfigError([f"--{n} is a DiT/SiT option; a MaskGIT run decodes iteratively (--num_steps, "
                           "--cfg_scale, --r_temp, --sm_temp)" for n in given])
    c = parse_maskgit_config(raw, check_cache=False)
    s = c.sample
    cfg = maskgit_job.model_config(c, host)
    tx = maskgit_state.make_optimizer(c.optim)
    target = maskgit_state.abstract_state(cfg, tx, mesh, c.fsdp_min_size, c.ema.enabled)
    state = ckpt.restore(update, target).state
    params = state.ema if (s.use_ema and state.ema is not None) else state.params
    steps, cfg_scale = _pick(overrides, "num_steps", s.steps), _pick(overrides, "cfg_scale", s.cfg_scale)
    r_temp, sm_temp = _pick(overrides, "r_temp", s.r_temp), _pick(overrides, "sm_temp", s.sm_temp)
    try:
        maskgit_sampling.reveal_schedule(steps, cfg.num_tokens, s.schedule)
    except ValueError as e:
        raise ConfigError([f"--num_steps: {e}"]) from None
    vq = build_autoencoder(maskgit_job.cache_tokenizer(host, overrides.get("vae") or s.vae))
    generate = maskgit_sampling.make_generate(
        maskgit_state.functional_model(cfg), maskgit_sampling.make_code_decoder(vq), mesh, steps=steps,
        schedule=s.schedule, sm_temp=sm_temp, r_temp=r_temp, cfg_scale=cfg_scale, randomize=s.randomize,
        class_labels=overrides.get("labels") or "random")
    return generate, params, f"maskgit{steps}-cfg{cfg_scale:g}-r{r_temp:g}", s.seed


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    host_malloc.tune_for_cpu()  # before JAX starts its backend
    setup_logging()
    f = flags.FLAGS
    maybe_initialize(f.distributed)
    handled = (ConfigError, FileNotFoundError)
    try:
        with failures_shared(handled):
            path = run_sampling(f.workdir, {n: getattr(f, n) for n in OVERRIDES}, f.config)
    except handled as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"samples written to {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
