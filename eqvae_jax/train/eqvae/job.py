"""The EQ fine-tuning job, for a KL autoencoder (`trainer = 'eqvae'`, configs/sdvae_ft.py) or a VQGAN
(`trainer = 'eqvqgan'`, configs/vqgan_ft.py): python -m eqvae_jax.main --config=configs/X.py.

Per micro-step, as the reference's two Lightning optimizer calls: the host draws a transform (branch, scale,
rotation), the jitted generator step updates the autoencoder, the host draws again (or, in 'shared' mode,
reuses the generator's pair) and the jitted discriminator step updates D. Each (branch, scale) is its own
compiled program; they are counted and timed. The shared loop (train/loop.py) does resume, logging,
evaluation, checkpoints and stopping; the end of training exports the autoencoder (diffusers for a KL model,
taming's checkpoint for a VQGAN). What differs between the families is in family.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from eqvae_jax.data.iterator import build_eval_iterator, build_train_iterator
from eqvae_jax.losses import equivariance
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh, place, replicated
from eqvae_jax.train import loop
from eqvae_jax.train.compile_pool import CompilePool, memory_map_warning
from eqvae_jax.train.compile_variants import VariantTracker
from eqvae_jax.train.eqvae import compile_order, evaluation, export, steps
from eqvae_jax.train.eqvae.config import FinetuneConfig, disc_stats_groups, parse_config
from eqvae_jax.train.eqvae.networks import Networks, build_networks
from eqvae_jax.train.eqvae.state import EQVAEState
from eqvae_jax.train.run_dir import RunServices, open_run

log = logging.getLogger(__name__)
PLAIN = equivariance.Draw(equivariance.Branch.PLAIN, (1, 1), 1)
# Config entries a resumed run must keep: they change the state's structure or what a step means.
RESUME_MUST_MATCH = ("model", "disc.ndf", "disc.n_layers", "optim.accumulate", "ema.enabled", "global_batch_size",
                     "data.image_size")


@dataclasses.dataclass
class Built:
    """The job's networks, jitted steps and initial state on the mesh (nothing compiled yet)."""

    config: FinetuneConfig
    mesh: Mesh
    nets: Networks
    spec: steps.StepSpec
    steps: steps.CompiledSteps
    state: EQVAEState
    lpips_state: Any


def build(config: FinetuneConfig) -> Built:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    nets = build_networks(config, disc_stats_groups(config, batch_divisor(mesh)))
    spec = steps.make_spec(config, nets)
    state = steps.initial_state(spec, nets.vae_params, nets.disc_params, nets.disc_stats)
    compiled = steps.compile_steps(spec, state, nets.lpips_state, mesh)
    lpips_state = jax.device_put(nets.lpips_state, replicated(mesh)) if nets.lpips_state is not None else None
    return Built(config, mesh, nets, spec, compiled, place(state, compiled.state_sharding), lpips_state)


def evaluated_params(config: FinetuneConfig, state: EQVAEState) -> Any:
    """The autoencoder weights that are evaluated and exported: the EMA when enabled."""
    return state.ema if config.ema.enabled else state.vae


def branch_metrics(prefix: str, draw: equivariance.Draw) -> dict[str, float]:
    out = {f"{prefix}/{b.value}": float(draw.branch is b) for b in equivariance.Branch}
    out[f"{prefix}/scale"] = draw.scale[0] / draw.denominator
    return out


class FinetuneRun:
    """One run's host-side pieces (transform sampler, compiled-variant trackers, compile pool, data) and the
    hooks the loop calls; `outputs` collects the files written (reconstruction grid, exports)."""

    def __init__(self, config: FinetuneConfig, built: Built, services: RunServices):
        self.config, self.built, self.services = config, built, services
        self.family = built.spec.family
        self.name = config.trainer
        self.image_hw = (config.data.image_size,) * 2
        self.sampler = equivariance.TransformSampler(config.transform, config.seed)
        plans = equivariance.all_plans(config.transform, self.image_hw)
        self.pretrain_micro = config.pretrain_updates * config.optim.accumulate
        expected = len(plans) + (1 if self.pretrain_micro
                                 and equivariance.BranchPlan(equivariance.Branch.PLAIN) not in plans else 0)
        log.info("%s: %s, lr %.3g, %d micro-steps of %d images per update, mesh %s, D statistics and adaptive GAN "
                 "weight in %d and %d groups; %d compiled variants per step %s", self.name, self.family.kind,
                 config.learning_rate, config.optim.accumulate, config.global_batch_size, dict(built.mesh.shape),
                 built.nets.disc_stats_groups, built.spec.loss.adaptive_weight_groups, expected,
                 equivariance.plans_summary(plans))
        if warning := memory_map_warning(2 * expected, jax.default_backend()):
            log.warning("%s: %s", self.name, warning)
        self.pool = CompilePool(config.compile.workers, log.info) if config.compile.ahead else None
        self.g_variants = VariantTracker("g_step", expected, log.info, self.pool, static_argnums=(5,))
        self.d_variants = VariantTracker("d_step", expected, log.info, self.pool, static_argnums=(5,))
        self.base_key = jax.random.key(config.seed)
        self.data = build_train_iterator(config.data, built.mesh, config.global_batch_size)
        self.eval_step = self.family.make_eval_step(built.spec.vae_graph, built.spec.lpips_graph, config.seed)
        self.summary_fn = self.family.make_summary_fn(built.spec.vae_graph)
        self.outputs: dict[str, str] = {}

    def draw(self, micro: int) -> tuple[equivariance.BranchPlan, np.int32, equivariance.Draw]:
        d = PLAIN if micro < self.pretrain_micro else self.sampler.draw()
        plan, rot = d.plan(self.image_hw)
        return plan, rot, d

    def train_step(self, state: EQVAEState, batch: dict[str, jax.Array], micro: int):
        """One micro-step: a drawn generator step, then a discriminator step."""
        built = self.built
        key_g, key_d = jax.random.split(jax.random.fold_in(self.base_key, micro))
        plan, rot, d = self.draw(micro)
        state, g_metrics, pair = self.g_variants(plan, built.steps.generator, state, built.lpips_state,
                                                 batch["image"], rot, key_g, plan)
        d_plan, d_rot, d_draw = (plan, rot, d) if built.spec.return_pair else self.draw(micro)
        state, d_metrics = self.d_variants(d_plan, built.steps.discriminator, state, batch["image"], d_rot, key_d,
                                           pair, d_plan)
        nonfinite = g_metrics["g/nonfinite"] + d_metrics["d/nonfinite"]
        return state, {**g_metrics, **d_metrics, "nonfinite": nonfinite, **branch_metrics("branch_g", d),
                       **branch_metrics("branch_d", d_draw)}

    def compile_ahead(self, first_micro: int) -> None:
        """Queue every program the rest of the run will draw, in the order it will draw them."""
        if self.pool is None:
            return
        config, built = self.config, self.built
        remaining = range(first_micro, config.total_updates * config.optim.accumulate)
        programs = compile_order.programs_in_need_order(config.transform, self.sampler.state(), self.image_hw,
                                                        remaining, self.pretrain_micro, built.spec.return_pair)
        compile_order.submit_programs(self.pool, programs, built.steps, compile_order.abstract(built.state),
                                      compile_order.abstract(built.lpips_state), built.mesh,
                                      (config.global_batch_size, *self.image_hw, 3), built.spec.return_pair)
        log.info("%s: compiling %d programs ahead on %d threads (compile.ahead; in the order of first use)",
                 self.name, len(programs), self.pool.workers)

    def evaluate(self, state: EQVAEState, update: int, writer: Any) -> dict[str, float]:
        config, built = self.config, self.built
        params = evaluated_params(config, state)
        results = {}
        if config.eval.batches:
            results = evaluation.evaluate(self.eval_step, params, built.lpips_state,
                                          build_eval_iterator(config.data, built.mesh, config.eval_batch_size),
                                          config.eval.batches)
            if results:
                log.info("%s: monitoring at update %d on %d held-out images (%s %d px), not the paper's 50K-image "
                         "evaluation", self.name, update, int(results["eval/images"]),
                         config.data.eval_transform, config.data.image_size)
        if config.eval.images:
            grid = evaluation.write_image_summaries(self.summary_fn, params, config, built.mesh, writer, update,
                                                    self.services.workdir)
            if grid:
                self.outputs["reconstructions"] = grid
        return results

    def log_scalars(self, scalars: dict[str, float]) -> dict[str, float]:
        out = {**self.g_variants.summary(), **self.d_variants.summary(),
               **(self.pool.progress() if self.pool else {})}
        out.update({f"data/skipped_{k}": float(v) for k, v in self.data.skip_counts.items()})
        return out

    def finish(self, state: EQVAEState) -> dict[str, str]:
        if self.config.export_at_end:
            self.outputs[self.family.export_name] = export.export_autoencoder(
                self.built.spec.vae_graph, evaluated_params(self.config, state), f"{self.services.workdir}/export")
        return self.outputs

    def console_fields(self, scalars: Mapping[str, float]) -> tuple[tuple[str, str], ...]:
        """The family's progress-line columns less the switched-off terms: LPIPS at weight 0, the adaptive GAN
        weight and the discriminator loss while the GAN is off (before loss.disc_start: disc_factor 0)."""
        off = {"g/lpips"} if self.config.loss.perceptual_weight == 0 else set()
        if scalars.get("g/disc_factor", 1.0) == 0:
            off |= {"g/d_weight", "d/disc_loss"}
        return tuple(f for f in self.family.console_fields if f[1] not in off)

    def job(self) -> loop.Job:
        config, built, family = self.config, self.built, self.family
        pretrain = config.pretrain_updates
        return loop.Job(
            name=self.name,
            state=built.state,
            train_step=self.train_step,
            data=self.data,
            host=loop.NamedHostState("sampler", self.sampler),
            resume_must_match=RESUME_MUST_MATCH,
            evaluate=self.evaluate,
            eval_every=config.eval.every_updates,
            log_scalars=self.log_scalars,
            console_fields=self.console_fields,
            summary_metrics=family.summary_metrics,
            overview={"autoencoder": built.state.vae, "discriminator": built.state.disc,
                      "LPIPS (frozen)": built.lpips_state or {},
                      "optimizer states": (built.state.opt_g, built.state.opt_d)},
            extras=loop.Extras(
                micro_steps_per_update=config.optim.accumulate,
                milestones=(pretrain,) if pretrain else (),  # the end of pre-training
                interval_scalars=family.interval_scalars,
                on_start=self.compile_ahead,
                finish=self.finish,
            ),
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.services.close()
        self.data.close()


def run(config: ConfigDict | FinetuneConfig, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) to config.total_updates; returns the loop's summary (train/loop.py)."""
    config = config if isinstance(config, FinetuneConfig) else parse_config(config)
    built = build(config)
    services = open_run(config, workdir)
    job = FinetuneRun(config, built, services)
    try:
        summary = loop.run(job.job(), config, services, stop_after)
    finally:
        job.close()
    summary["g_variants"], summary["d_variants"] = job.g_variants.count, job.d_variants.count
    summary["compiled_ahead"] = job.g_variants.ahead_count + job.d_variants.ahead_count
    return summary
