"""DiT / SiT training on a latent cache (`trainer = 'dit'`): configs/dit_b2.py, dit_xl2.py, sit_b2.py, sit_xl2.py.

    python -m eqvae_jax.main --config=configs/dit_xl2.py --workdir=gs://.../dit_xl2 \
        --config.latents.cache_dir=gs://.../latents/imagenet256

Shares the run machinery with the autoencoder job (train/run.py): Orbax checkpoints of train state + host
state + Grain iterator + config, auto-resume from --workdir, SIGTERM saves and exits, a non-finite guard,
clu writers and ReportProgress. Metrics are fetched once per log interval.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from eqvae_jax.data.latent_cache import build_latent_iterator
from eqvae_jax.models.dit import dit_flops
from eqvae_jax.parallel.mesh import make_mesh
from eqvae_jax.train import dit_config, dit_state, metrics
from eqvae_jax.train.dit_steps import make_train_step
from eqvae_jax.train.eqvae_config import to_json_dict
from eqvae_jax.train.run import check_nonfinite, start_run

# Config entries that must not change when a run resumes (they change the model or what it learns).
_RESUME_FIXED = ("objective", "model", "latents.cache_dir")


def _check_resume_config(saved: dict[str, Any] | None, config: ConfigDict) -> None:
    if not saved:
        return
    now = to_json_dict(config)
    for key in _RESUME_FIXED:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            raise ValueError(f"resuming with a different {key}: checkpoint has {a!r}, config has {b!r}")


def read_items(ckpt_dir: str, step: int, names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON items (host state, config) of a checkpoint, without restoring any arrays."""
    import orbax.checkpoint as ocp

    saved = {n for n in names if os.path.isdir(os.path.join(ckpt_dir, str(step), n))}
    if not saved:
        return {}
    mgr = ocp.CheckpointManager(ckpt_dir)
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in saved}))
    finally:
        mgr.close()
    return {n: dict(out[n]) for n in saved}


def run(config: ConfigDict, workdir: str) -> dit_state.TrainState:
    """Train until config.total_steps (or a stop request); returns the final train state."""
    dit_config.validate(config)
    mesh = make_mesh(dit_config.resolve_data_axis(config.mesh.data), config.mesh.fsdp)
    iterator, meta = build_latent_iterator(config.latents, mesh, config.global_batch_size)
    scale = config.latents.scaling_factor or meta["scaling_factor"]
    shift = meta["shift_factor"] if config.latents.shift_factor is None else config.latents.shift_factor
    cfg = dit_config.dit_model_config(config, tuple(meta["latent_shape"]))
    services = start_run(config, workdir, config.total_steps)
    model, state, shardings = dit_state.create(cfg, config, mesh)
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    flops = dit_flops(cfg, config.global_batch_size, train=True)
    logging.info("model: %s, %.1fM params, %.1f TFLOP per step; mesh %s", cfg, nparams / 1e6, flops / 1e12,
                 dict(mesh.shape))

    host: dict[str, Any] = {"nonfinite_total": 0, "scaling_factor": float(scale), "shift_factor": float(shift),
                            "latent_shape": list(meta["latent_shape"]), "vae": meta["vae"]}
    latest = services.checkpointer.latest_step()
    if latest is not None:
        _check_resume_config(read_items(services.checkpointer.directory, latest, ("config",)).get("config"), config)
        restored = services.checkpointer.restore(latest, state, iterator)
        state = restored.state
        host["nonfinite_total"] = int(restored.host.get("nonfinite_total", 0))
        logging.info("resumed from step %d", latest)

    tx = dit_state.make_optimizer(config)
    step_fn = make_train_step(model, tx, config, float(scale), float(shift), mesh, shardings)
    key = jax.random.key(config.seed)
    sampler = _periodic_sampler(config, model, mesh, host) if config.log.sample_every_steps else None
    buffer, finite = metrics.MetricBuffer(), []
    consecutive = 0
    step = int(jax.device_get(state.step))
    last_time, last_step = time.perf_counter(), step

    def save(step: int) -> None:
        services.checkpointer.save(step, state, dict(host), to_json_dict(config), iterator)

    try:
        while step < config.total_steps:
            batch = next(iterator)
            state, m = step_fn(state, batch, key)
            step += 1
            buffer.add(m)
            finite.append(m["finite"])
            services.progress(step)
            stop = services.stop.should_stop(step)
            if step % config.log.every_steps == 0 or step == config.total_steps or stop:
                for ok in jax.device_get(finite):
                    consecutive = 0 if ok else consecutive + 1
                    host["nonfinite_total"] += int(not ok)
                finite = []
                check_nonfinite(consecutive, host["nonfinite_total"], config.max_consecutive_nonfinite, step)
                summary = buffer.summary()
                now = time.perf_counter()
                summary["model_tflops_per_s"] = flops * (step - last_step) / max(now - last_time, 1e-9) / 1e12
                last_time, last_step = now, step
                services.writer.write_scalars(step, summary)
            if sampler is not None and step % config.log.sample_every_steps == 0:
                services.writer.write_images(step, {"samples": sampler(state.ema)[None]})
            if stop or step == config.total_steps or services.checkpointer.should_save(step):
                save(step)
            if stop:
                logging.warning("stop requested: saved step %d, exiting", step)
                break
    finally:
        iterator.close()
        services.close()
    return state


def _periodic_sampler(config: ConfigDict, model: dit_state.Model, mesh, host: dict[str, Any]):
    """A small decoded sample grid from the EMA params (fixed seed and labels, so grids are comparable)."""
    from eqvae_jax import sample
    from eqvae_jax.train import latent_config

    spec = dict(host["vae"])
    if config.sample.vae:
        spec = {**spec, "init": "weights", "weights": config.sample.vae}
    decode = sample.make_decoder(latent_config.load_vae(spec), host["scaling_factor"], host["shift_factor"])
    generate = sample.make_generate(model, decode, mesh, dit_config.sampler_name(config), config.log.sample_steps,
                                    config.sample.cfg_scale, config.sample.guide_channels, config.sample.ode_method,
                                    "cycle")
    count = config.log.sample_count
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-count // shards) * shards

    def grid(params: dict) -> np.ndarray:
        images, _ = sample.generate_all(generate, params, config.sample.seed, count, batch, mesh)
        return sample.image_grid(images, count)

    return grid
