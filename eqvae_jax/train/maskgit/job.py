"""MaskGIT training on a token cache (`trainer = 'maskgit'`): configs/maskgit.py (`:tiny`, `:chang`).

    python -m eqvae_jax.main --config=configs/maskgit.py --workdir=gs://.../maskgit_base \
        --config.tokens.cache_dir=gs://.../tokens/imagenet256

One jitted step per update (FSDP inside a slice); the shared loop (train/loop.py) does resume, logging,
checkpoints, stopping and the non-finite policy. A periodic sample grid (`sample.grid_every_updates`), decoded
with the VQ model that made the cache (its spec is in the cache's meta and in every checkpoint's host state), is
optional.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from ml_collections import ConfigDict

from eqvae_jax.data.latent_cache import build_token_iterator
from eqvae_jax.maskgit import sampling
from eqvae_jax.models.autoencoders import AutoencoderSpec, build_autoencoder
from eqvae_jax.models.maskgit import FunctionalMaskGIT, maskgit_flops
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train import loop
from eqvae_jax.train.maskgit import state as mg_state
from eqvae_jax.train.maskgit.config import MaskGITJobConfig, parse_config
from eqvae_jax.train.maskgit.steps import make_train_step
from eqvae_jax.train.run_dir import open_run
from eqvae_jax.typed_config import parse

log = logging.getLogger(__name__)
# Config entries a resumed run must keep: they change the model, what it learns, its state's layout or its data.
RESUME_MUST_MATCH = ("model", "objective", "tokens.cache_dir", "ema.enabled")


def cache_tokenizer(host: dict[str, Any], vq_weights: str = "") -> AutoencoderSpec:
    """The VQ model that made the token cache (recorded in its meta), or the weights dir `vq_weights` instead."""
    spec = parse(AutoencoderSpec, host["vae"], "token cache vae")
    if vq_weights:
        return AutoencoderSpec(init="weights", weights=vq_weights, dtype=spec.dtype, kind=spec.kind)
    return spec


def model_config(config: MaskGITJobConfig, host: dict[str, Any]):
    """The transformer for the cache described by `host` (meta fields `codebook_size`, `token_shape`)."""
    return config.maskgit_config(int(host["codebook_size"]), int(host["token_shape"][0]))


def grid_sampler(config: MaskGITJobConfig, model: FunctionalMaskGIT, mesh: Any, host: dict[str, Any]):
    """params -> a small decoded sample grid (fixed seed, labels 0, 1, 2, ...: comparable over training)."""
    s = config.sample
    vq = build_autoencoder(cache_tokenizer(host, s.vae))
    return sampling.grid_sampler(model, sampling.make_code_decoder(vq), mesh, s.grid_count, s.seed,
                                 steps=s.steps, schedule=s.schedule, sm_temp=s.sm_temp, r_temp=s.r_temp,
                                 cfg_scale=s.cfg_scale, randomize=s.randomize)


def run(config: ConfigDict | MaskGITJobConfig, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Train until config.total_updates (or a stop request); returns the loop's summary (train/loop.py)."""
    config = config if isinstance(config, MaskGITJobConfig) else parse_config(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    data, meta = build_token_iterator(config.tokens, mesh, config.global_batch_size)
    host = {"vae": meta["vae"], "codebook_size": int(meta["codebook_size"]), "token_shape": list(meta["token_shape"])}
    cfg = model_config(config, host)
    services = open_run(config, workdir)
    tx = mg_state.make_optimizer(config.optim)
    model, state, shardings = mg_state.create(cfg, config.seed, tx, mesh, config.fsdp_min_size, config.ema.enabled)
    flops = maskgit_flops(cfg, config.global_batch_size, train=True)
    log.info("maskgit: %s; %.2f TFLOP per update; mesh %s", cfg, flops / 1e12, dict(mesh.shape))
    step_fn = make_train_step(model, tx, config, mesh, shardings)
    key = jax.random.key(config.seed)
    every = config.sample.grid_every_updates
    grid = grid_sampler(config, model, mesh, host) if every else None

    def evaluate(state: mg_state.TrainState, update: int, writer: Any) -> dict[str, float]:
        if grid is not None and (update % every == 0 or update == config.total_updates):
            params = state.ema if (config.sample.use_ema and state.ema is not None) else state.params
            writer.write_images(update, {"samples": grid(params)[None]})
        return {}

    def log_scalars(scalars: dict[str, float]) -> dict[str, float]:
        return {"perf/model_tflops_per_s": flops * scalars["perf/updates_per_s"] / 1e12}

    overview = {"MaskGIT": state.params, "optimizer state": state.opt_state}
    if state.ema is not None:
        overview["EMA"] = state.ema
    job = loop.Job(
        name="maskgit",
        state=state,
        train_step=lambda s, batch, micro: step_fn(s, batch, key),
        data=data,
        resume_must_match=RESUME_MUST_MATCH,
        host=loop.FixedHostState(host),
        evaluate=evaluate if grid is not None else None,
        eval_every=every,
        log_scalars=log_scalars,
        console_fields=(("loss", "loss"), ("acc", "accuracy"), ("masked acc", "masked_accuracy"),
                        ("grad", "grad_norm"), ("lr", "lr")),
        overview=overview,
    )
    try:
        return loop.run(job, config, services, stop_after)
    finally:
        data.close()
        services.close()
