"""The EQ-VAE fine-tuning job (`trainer = 'eqvae'`): python -m eqvae_jax.main --config=configs/sdvae_ft.py.

Per micro-step (recipe.md §1.2): the host draws a transform, the jitted generator step updates the autoencoder,
the host draws again (or reuses the pair in 'shared' mode) and the jitted discriminator step updates D. Metrics
are fetched once per log interval; held-out evaluation, image summaries and checkpoints run at their intervals;
SIGTERM saves and exits; the end of training exports the autoencoder as a diffusers directory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental.multihost_utils import process_allgather
from ml_collections import ConfigDict
from PIL import Image

from eqvae_jax.data.iterator import build_eval_iterator, build_train_iterator
from eqvae_jax.losses import autoencoder, equivariance, variants
from eqvae_jax.models import kl_vae
from eqvae_jax.models.weights import flat_variables
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh
from eqvae_jax.train import eqvae_config, eqvae_eval, eqvae_steps
from eqvae_jax.train.eqvae_models import build_networks
from eqvae_jax.train.eqvae_state import EQVAEState, adam, create_state
from eqvae_jax.train.metrics import MetricBuffer
from eqvae_jax.train.run import RunServices, check_nonfinite, start_run

PLAIN = equivariance.Draw(equivariance.Branch.PLAIN, (1, 1), 1)


@dataclasses.dataclass
class Job:
    """Everything the loop needs, built from the config."""

    config: ConfigDict
    mesh: Any
    nets: Any
    spec: eqvae_steps.StepSpec
    steps: eqvae_steps.CompiledSteps
    state: EQVAEState
    lpips_state: Any
    sampler: equivariance.TransformSampler
    image_hw: tuple[int, int]
    total_micro_steps: int
    pretrain_micro_steps: int
    eval_step: Any = None  # jitted once, reused by every evaluation
    summary_fn: Any = None


def build_job(config: ConfigDict) -> Job:
    """Validate the config, then build networks, optimizers, state and the jitted steps (nothing compiles yet)."""
    eqvae_config.validate(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    stats_groups = eqvae_config.disc_stats_groups(config, batch_divisor(mesh))
    nets = build_networks(config, stats_groups)
    lr = eqvae_config.learning_rate(config)
    o = config.optim
    tx_g = adam(lr, o.b1, o.b2, o.eps, o.accumulate)
    tx_d = adam(lr, o.b1, o.b2, o.eps, o.accumulate)
    spec = eqvae_steps.StepSpec(
        vae_graph=nets.vae_graph,
        disc_graph=nets.disc_graph,
        lpips_graph=nets.lpips_graph,
        loss=autoencoder.LossConfig.from_config(config.loss),
        tx_g=tx_g,
        tx_d=tx_d,
        accumulate=o.accumulate,
        ema_decay=config.ema.decay if config.ema.enabled else None,
        return_pair=config.d_step_transform == "shared",
    )
    state = create_state(nets.vae_params, nets.disc_params, nets.disc_stats, tx_g, tx_d, config.ema.enabled)
    steps = eqvae_steps.compile_steps(spec, state, nets.lpips_state, mesh)
    state = eqvae_steps.place(state, steps.state_sharding)
    lpips_state = nets.lpips_state
    if lpips_state is not None:
        lpips_state = jax.device_put(lpips_state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sampler = equivariance.TransformSampler(equivariance.TransformConfig.from_config(config.transform), config.seed)
    size = config.data.image_size
    logging.info("eqvae: lr %.3g (%s), %d micro-steps per update, batch %d per micro-step, mesh %s",
                 lr, "scaled" if o.scale_lr else "base", o.accumulate, config.data.global_batch_size,
                 dict(mesh.shape))
    return Job(config, mesh, nets, spec, steps, state, lpips_state, sampler, (size, size),
               config.total_steps * o.accumulate, config.pretrain_steps * o.accumulate,
               eqvae_eval.make_eval_step(spec.vae_graph, spec.lpips_graph, config.seed),
               eqvae_eval.make_summary_fn(spec.vae_graph))


def host_state(job: Job, step: int) -> dict[str, Any]:
    return {"sampler": job.sampler.state(), "step": step}


def save(job: Job, services: RunServices, step: int, train_it) -> None:
    services.checkpointer.save(step, job.state, host_state(job, step),
                               config=eqvae_config.to_json_dict(job.config), data_iterator=train_it)


def restore_if_any(job: Job, services: RunServices, train_it) -> int:
    """Resume from the latest checkpoint in the workdir; returns the micro-step to continue from."""
    latest = services.checkpointer.latest_step()
    if latest is None:
        return 0
    restored = services.checkpointer.restore(latest, job.state, data_iterator=train_it)
    job.state = restored.state
    job.sampler.set_state(restored.host["sampler"])
    logging.info("eqvae: resumed at micro-step %d from %s", latest, services.checkpointer.directory)
    return latest


def consecutive_nonfinite(job: Job) -> int:
    return int(max(job.state.nonfinite_run, job.state.nonfinite_run_d))


def draw(job: Job, step: int) -> tuple[equivariance.BranchPlan, np.int32, equivariance.Draw]:
    d = PLAIN if step < job.pretrain_micro_steps else job.sampler.draw()
    plan, rot = d.plan(job.image_hw)
    return plan, rot, d


def branch_metrics(prefix: str, d: equivariance.Draw) -> dict[str, float]:
    out = {f"{prefix}/{b.value}": float(d.branch is b) for b in equivariance.Branch}
    out[f"{prefix}/scale"] = d.scale[0] / d.denominator
    return out


def eval_params(job: Job):
    """The autoencoder weights that are evaluated and exported: the EMA when enabled."""
    return job.state.ema if job.config.ema.enabled else job.state.vae


def run_eval(job: Job, services: RunServices, step: int) -> dict[str, float]:
    c = job.config
    if not c.log.eval_batches:
        return {}
    results = eqvae_eval.evaluate(job.eval_step, eval_params(job), job.lpips_state,
                                  build_eval_iterator(c.data, job.mesh), c.log.eval_batches)
    if results:
        services.writer.write_scalars(step, results)
        logging.info("eval at micro-step %d: %s", step,
                     ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in sorted(results.items())))
    write_image_summaries(job, services, step)
    return results


def write_image_summaries(job: Job, services: RunServices, step: int) -> str | None:
    """Inputs / reconstructions / transformed inputs / decoded transformed latents, to TensorBoard and a PNG."""
    c = job.config
    if not c.log.images:
        return None
    it = build_eval_iterator(c.data, job.mesh)
    try:
        batch = next(iter(it))
    finally:
        it.close()
    outputs = job.summary_fn(eval_params(job), batch["image"]) + (batch["image"], batch["mask"])
    recon, decoded_t, target_t, images, mask = (np.asarray(a) for a in process_allgather(outputs, tiled=True))
    keep = np.flatnonzero(mask)[: c.log.images]  # padding of the last eval batch is not shown
    if keep.size == 0:
        return None
    images = np.clip((images + 1) / 2, 0, 1)
    rows = [images[keep], recon[keep], target_t[keep], decoded_t[keep]]
    grid = eqvae_eval.image_grid(rows)
    services.writer.write_images(step, {"reconstructions": grid[None]})
    path = os.path.join(services.workdir, "reconstructions.png")
    if jax.process_index() == 0:
        with epath.Path(path).open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
    return path


def export_diffusers(job: Job, dst: str, use_ema: bool) -> str:
    """Write the (EMA, if enabled) autoencoder to DST/diffusers (a diffusers AutoencoderKL dir) and DST/flax."""
    from flax import nnx

    from eqvae_jax.convert import kl_vae as convert_kl_vae

    params = eval_params(job) if use_ema else job.state.vae
    vae = nnx.merge(job.spec.vae_graph, jax.device_get(process_allgather(params, tiled=True)))
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:  # written locally, then copied (the workdir may be gs://)
            convert_kl_vae.write_diffusers(os.path.join(tmp, "diffusers"), vae.config, flat_variables(vae))
            kl_vae.save(vae, os.path.join(tmp, "flax"))
            for name in ("diffusers", "flax"):
                copy_tree(os.path.join(tmp, name), os.path.join(dst, name))
    return os.path.join(dst, "diffusers")


def copy_tree(src: str, dst: str) -> None:
    """Replace `dst` (local or gs://) with a copy of the local directory `src`."""
    target = epath.Path(dst)
    if target.exists():
        target.rmtree()
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = target / rel if rel != "." else target
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            epath.Path(os.path.join(root, name)).copy(out / name)


def run(config: ConfigDict, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) to config.total_steps optimizer updates; returns a summary of the run.

    `stop_after=N` stops like a SIGTERM would (checkpoint, then return) once N micro-steps ran in this call.
    """
    job = build_job(config)
    services = start_run(config, workdir, job.total_micro_steps)
    train_it = build_train_iterator(config.data, job.mesh)
    start = restore_if_any(job, services, train_it)
    cfg_t = equivariance.TransformConfig.from_config(config.transform)
    plans = equivariance.all_plans(cfg_t, job.image_hw)
    expected = len(plans) + (1 if job.pretrain_micro_steps and equivariance.BranchPlan(
        equivariance.Branch.PLAIN) not in plans else 0)
    logging.info("eqvae: %d compiled variants expected per step function %s", expected,
                 equivariance.plans_summary(plans))
    g_variants = variants.VariantTracker("g_step", expected, logging.info)
    d_variants = variants.VariantTracker("d_step", expected, logging.info)
    summary: dict[str, Any] = {"start_step": start}
    if start == 0:
        summary["eval_before"] = run_eval(job, services, 0)
    if start < job.pretrain_micro_steps:
        logging.info("eqvae: plain-reconstruction pre-training until micro-step %d", job.pretrain_micro_steps)
    buffer = MetricBuffer()
    base_key = jax.random.key(config.seed)
    step = start
    try:
        for step in range(start, job.total_micro_steps):
            batch = next(train_it)
            key_g, key_d = jax.random.split(jax.random.fold_in(base_key, step))
            plan, rot, d = draw(job, step)
            job.state, g_metrics, pair = g_variants(
                plan, job.steps.generator, job.state, job.lpips_state, batch["image"], rot, key_g, plan)
            if job.spec.return_pair:
                d_plan, d_rot, d_draw = plan, rot, d
            else:
                d_plan, d_rot, d_draw = draw(job, step)
            job.state, d_metrics = d_variants(
                d_plan, job.steps.discriminator, job.state, batch["image"], d_rot, key_d, pair, d_plan)
            buffer.add({**g_metrics, **d_metrics, **branch_metrics("branch_g", d),
                        **branch_metrics("branch_d", d_draw)})
            done = step + 1
            services.progress(done)
            if done % config.log.every_steps == 0 or done == job.total_micro_steps:
                scalars = buffer.summary()
                check_nonfinite(consecutive_nonfinite(job), int(job.state.nonfinite_total),
                                config.max_consecutive_nonfinite, done)
                scalars.update(g_variants.summary())
                scalars.update(d_variants.summary())
                scalars.update({f"data/skipped_{k}": float(v) for k, v in train_it.skip_counts.items()})
                services.writer.write_scalars(done, scalars)
                summary["last_metrics"] = scalars
            if done == job.pretrain_micro_steps and done != job.total_micro_steps:
                summary["eval_after_pretrain"] = run_eval(job, services, done)
            elif done % config.log.eval_every_steps == 0 and done != job.total_micro_steps:
                run_eval(job, services, done)
            if stop_after is not None and done - start >= stop_after:
                services.stop.request()
            stop = services.stop.should_stop(done)
            boundary = done in (job.pretrain_micro_steps, job.total_micro_steps)
            if (services.checkpointer.should_save(done) or stop or boundary) and \
                    done not in services.checkpointer.all_steps():
                check_nonfinite(consecutive_nonfinite(job), int(job.state.nonfinite_total),
                                config.max_consecutive_nonfinite, done)
                save(job, services, done, train_it)
            if stop:
                logging.warning("eqvae: stopped by request at micro-step %d (checkpoint saved)", done)
                summary["stopped"] = done
                summary["state"] = job.state
                return summary
        step = job.total_micro_steps
        summary["eval_after"] = run_eval(job, services, step)
        if config.export_diffusers:
            summary["export"] = export_diffusers(job, os.path.join(services.workdir, "export"), config.ema.enabled)
        summary["g_variants"] = g_variants.count
        summary["d_variants"] = d_variants.count
        summary["steps"] = step
        summary["state"] = job.state
        summary["reconstructions"] = os.path.join(services.workdir, "reconstructions.png")
        return summary
    finally:
        services.close()
        train_it.close()
        print_locations(services.workdir, summary)


def print_locations(workdir: str, summary: dict[str, Any]) -> None:
    if jax.process_index():
        return
    lines = [
        f"TensorBoard logs:   {os.path.join(workdir, 'tensorboard')}",
        f"checkpoints:        {os.path.join(workdir, 'checkpoints')}",
    ]
    if summary.get("reconstructions"):
        lines.append(f"reconstructions:    {summary['reconstructions']}")
    if summary.get("export"):
        lines.append(f"diffusers export:   {summary['export']}")
    for key in ("eval_before", "eval_after_pretrain", "eval_after"):
        r = summary.get(key)
        if r:
            keys = ("eval/equivariance/rotation", "eval/equivariance/scale", "eval/psnr", "eval/ssim", "eval/lpips")
            lines.append(f"{key:19s} " + "  ".join(f"{k.removeprefix('eval/')}={r[k]:.4f}" for k in keys if k in r))
    print("\n".join(lines), flush=True)
