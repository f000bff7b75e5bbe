"""DiT / SiT training on a latent cache (`trainer = 'dit'`): configs/dit.py (`:model=XL/2,objective=sit,tiny`).

    python -m eqvae_jax.main --config=configs/dit.py:model=XL/2 --workdir=gs://.../dit_xl2 \
        --config.latents.cache_dir=gs://.../latents/imagenet256

One jitted step per update (FSDP inside a slice); the shared loop (train/loop.py) does resume, logging,
checkpoints, stopping and the non-finite policy. Optional monitoring through the loop's evaluation hook, from the
EMA weights: a sample grid every `sample.grid_every_updates`, and gFID-N (ADM's FID, sFID, IS, precision and
recall of `sample.fid_num_samples` samples against `sample.fid_reference`, logged as eval/fid, ...) every
`sample.fid_every_updates` and at the end of training.
SiT + REPA (`configs/dit.py:model=XL/2,objective=sit,repa`) adds the frozen DINOv2 teacher as a further step input.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
from ml_collections import ConfigDict

from eqvae_jax.data.latent_cache import build_latent_iterator
from eqvae_jax.diffusion import sampling
from eqvae_jax.eval import inception
from eqvae_jax.eval.adm_metrics import MIN_FID_IMAGES
from eqvae_jax.eval.features import InceptionExtractor
from eqvae_jax.eval.generation import GenerationEvaluator
from eqvae_jax.models.autoencoders import AutoencoderSpec, build_autoencoder
from eqvae_jax.models.dinov2 import dinov2_flops
from eqvae_jax.models.dit import FunctionalDiT, dit_flops
from eqvae_jax.models.repa import teacher_input_size
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh, replicated
from eqvae_jax.train import loop
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import DiTJobConfig, parse_config
from eqvae_jax.train.dit.steps import latent_factors, make_train_step
from eqvae_jax.train.run_dir import open_run
from eqvae_jax.typed_config import parse

log = logging.getLogger(__name__)
# Config entries a resumed run must keep: they change the model or what it learns. The REPA entries are checked
# only when REPA is on, so that runs from before the `repa` section resume (a REPA run resumed without REPA
# fails on its checkpoint's extra projector params instead).
RESUME_MUST_MATCH = ("objective", "model", "latents.cache_dir")
GFID_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
REPA_RESUME_MUST_MATCH = ("repa.enabled", "repa.z_dim", "repa.projector_dim", "repa.encoder_depth",
                          "repa.proj_coeff")


def cache_autoencoder(host: dict[str, Any], vae_weights: str = "") -> AutoencoderSpec:
    """The autoencoder that encoded the cache (recorded in its meta), or `vae_weights` instead."""
    spec = parse(AutoencoderSpec, host["vae"], "latent cache vae")
    return AutoencoderSpec(init="weights", weights=vae_weights, dtype=spec.dtype) if vae_weights else spec


def run(config: ConfigDict | DiTJobConfig, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Train until config.total_updates (or a stop request); returns the loop's summary (train/loop.py)."""
    config = config if isinstance(config, DiTJobConfig) else parse_config(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    aligned = config.repa.enabled
    data, meta = build_latent_iterator(config.latents, mesh, config.global_batch_size, images=aligned)
    scale = config.latents.scaling_factor or meta["scaling_factor"]
    shift = meta["shift_factor"] if config.latents.shift_factor is None else config.latents.shift_factor
    cfg = config.dit_config(tuple(meta["latent_shape"]))
    services = open_run(config, workdir)
    tx = dit_state.make_optimizer(config.optim)
    model, state, shardings = dit_state.create(cfg, config.seed, tx, mesh, config.fsdp_min_size)
    flops = dit_flops(cfg, config.global_batch_size, train=True)
    teacher, teacher_shardings, extra = None, None, ()
    if aligned:
        tcfg = config.teacher_config()
        teacher, teacher_shardings = dit_state.create_teacher(config.repa, tcfg, mesh, config.fsdp_min_size,
                                                              config.seed)
        size = teacher_input_size(cfg.input_size // cfg.patch_size, tcfg.patch_size)
        flops += dinov2_flops(tcfg, size, config.global_batch_size)  # forward only
        log.info("repa: teacher %s (%s) at %d px, tokens after block %d aligned with weight %g",
                 config.repa.teacher, tcfg.compute_dtype, size, config.repa.encoder_depth, config.repa.proj_coeff)
        extra = (teacher,)
    log.info("dit: %s; %.1f TFLOP per update; mesh %s", cfg, flops / 1e12, dict(mesh.shape))
    step_fn = make_train_step(model, tx, config, mesh, shardings, teacher_shardings)
    factors = jax.device_put(latent_factors(float(scale), float(shift)), replicated(mesh))
    key = jax.random.key(config.seed)
    host = {"scaling_factor": float(scale), "shift_factor": float(shift), "latent_shape": list(meta["latent_shape"]),
            "vae": meta["vae"]}
    s = config.sample
    decode = _decoder(config, host) if s.grid_every_updates or s.fid_every_updates else None
    grid = _grid_sampler(config, model, mesh, decode) if s.grid_every_updates else None
    gfid = _gfid_evaluator(config, model, mesh, decode) if s.fid_every_updates else None

    def due(every: int, update: int) -> bool:
        return bool(every) and (update % every == 0 or update == config.total_updates)

    def evaluate(state: dit_state.TrainState, update: int, writer: Any) -> dict[str, float]:
        """The sample grid and gFID-N (not at update 0: a random model's FID is only a cost)."""
        if grid is not None and due(s.grid_every_updates, update):
            writer.write_images(update, {"samples": grid(state.ema)[None]})
        if gfid is None or update == 0 or not due(s.fid_every_updates, update):
            return {}
        return {f"eval/{k}": v for k, v in gfid(state.ema).items()}

    def log_scalars(scalars: dict[str, float]) -> dict[str, float]:
        return {"perf/model_tflops_per_s": flops * scalars["perf/updates_per_s"] / 1e12}

    job = loop.Job(
        name="dit",
        state=state,
        train_step=lambda s, batch, micro: step_fn(s, batch, key, factors, *extra),
        data=data,
        resume_must_match=RESUME_MUST_MATCH + (REPA_RESUME_MUST_MATCH if aligned else ()),
        host=loop.FixedHostState(host),
        evaluate=evaluate if grid is not None or gfid is not None else None,
        eval_every=math.gcd(s.grid_every_updates, s.fid_every_updates),
        summary_metrics=tuple(f"eval/{k}" for k in GFID_METRICS) if gfid is not None else (),
        log_scalars=log_scalars,
        console_fields=(("loss", "loss"), ("mse", "mse"), ("vb", "vb"), ("proj", "proj_loss"), ("grad", "grad_norm")),
        overview={"DiT": state.params, "EMA": state.ema, "optimizer state": state.opt_state,
                  **({"REPA teacher (frozen)": teacher.state} if aligned else {})},
    )
    try:
        return loop.run(job, config, services, stop_after)
    finally:
        data.close()
        services.close()


def _decoder(config: DiTJobConfig, host: dict[str, Any]):
    """Diffusion latents -> images with the cache's VAE (or `sample.vae`)."""
    vae = build_autoencoder(cache_autoencoder(host, config.sample.vae))
    return sampling.make_decoder(vae, host["scaling_factor"], host["shift_factor"])


def _gfid_evaluator(config: DiTJobConfig, model: FunctionalDiT, mesh: Any, decode: Any) -> GenerationEvaluator:
    """gFID-N of the EMA params: `python -m eqvae_jax.sample`'s draws (settings of `sample`, random labels), the
    Inception on the devices, ADM's metrics against `sample.fid_reference` (eval/generation.py)."""
    s = config.sample
    batch = s.fid_batch_size or 32 * batch_divisor(mesh)
    generate = sampling.make_generate(model, decode, mesh, config.sampler, s.num_steps, s.cfg_scale,
                                      s.guide_channels, s.ode_method, class_labels="random",
                                      guidance_interval=config.guidance_interval)
    extractor = InceptionExtractor(inception.load(s.inception), mesh, batch)
    if s.fid_num_samples < MIN_FID_IMAGES:
        log.warning("gFID from %d samples: fewer than %d give a biased FID (monitoring only)", s.fid_num_samples,
                    MIN_FID_IMAGES)
    log.info("gFID-%d every %d updates and at the end: %s %d steps, cfg %g in [%g, %g], seed %d, reference %s",
             s.fid_num_samples, s.fid_every_updates, config.sampler, s.num_steps, s.cfg_scale,
             *config.guidance_interval, s.seed, s.fid_reference)
    return GenerationEvaluator(generate, extractor, s.fid_reference, s.fid_num_samples, batch, s.seed)


def _grid_sampler(config: DiTJobConfig, model: FunctionalDiT, mesh: Any, decode: Any):
    """A small decoded sample grid from the EMA params (fixed seed and labels, so grids are comparable)."""
    return sampling.grid_sampler(model, decode, mesh, config.sampler, config.sample.grid_steps,
                                 config.sample.grid_count, config.sample.seed, cfg_scale=config.sample.cfg_scale,
                                 guide_channels=config.sample.guide_channels, ode_method=config.sample.ode_method,
                                 guidance_interval=config.guidance_interval)
