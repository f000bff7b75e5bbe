"""The jitted DiT/SiT train step: sample z from the cached posterior, diffusion/flow loss, AdamW, EMA.

All randomness of step s comes from fold_in(key, s), so an interrupted and resumed run draws exactly what an
uninterrupted one draws. A step whose loss, gradients or new params are not finite is not applied (the
step counter still advances with the data); the metric `nonfinite` reports it.

SiT + REPA (`config.repa.enabled`): the frozen teacher's patch tokens of the batch's uint8 crops are the
targets (computed in the step, outside the gradient), and the loss is sihyun-yu/REPA `loss.py` + `train.py`:
mean velocity MSE + proj_coeff * mean over tokens of -cos(target, projector(tokens after block
encoder_depth)). Time runs in SiT's direction (t = 1 is data, target x1 - x0) where REPA's SILoss runs the
other way (t = 0 is data, target noise - data): the same loss under t -> 1 - t, v -> -v (tested), so
the same samplers serve both.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from eqvae_jax.diffusion import gaussian, interpolant
from eqvae_jax.diffusion.likelihood import mean_flat
from eqvae_jax.diffusion.schedule import create_schedule
from eqvae_jax.models import repa
from eqvae_jax.models.dit import FunctionalDiT
from eqvae_jax.models.kl_vae import normalize_latents
from eqvae_jax.parallel.mesh import batch_sharding, replicated
from eqvae_jax.train.dit.config import DiTJobConfig, RepaConfig
from eqvae_jax.train.dit.state import Teacher, TrainState
from eqvae_jax.train.ema import ema_update
from eqvae_jax.train.guard import all_finite, update_if

Batch = dict[str, jax.Array]


def latent_factors(scale: float, shift: float) -> jax.Array:
    """The cache's (scaling_factor, shift_factor) as the train step's `factors` argument: an argument rather than
    a constant, so caches with other factors (e.g. the two arms of the replication) share one compiled step."""
    return jnp.asarray([scale, shift], jnp.float32)


def latents_from_batch(batch: Batch, key: jax.Array, scale: jax.Array | float, shift: jax.Array | float,
                       sample: bool) -> jax.Array:
    """z = mean + std * eps (or the mean), mapped to diffusion scale: (z - shift) * scale."""
    z = batch["mean"]
    if sample:
        z = z + batch["std"] * jax.random.normal(key, z.shape, z.dtype)
    return normalize_latents(z, scale, shift)


def sit_repa_loss(model: FunctionalDiT, params: dict, z: jax.Array, y: jax.Array, t: jax.Array, noise: jax.Array,
                  targets: jax.Array, encoder_depth: int, proj_coeff: float, drop_key: jax.Array | None = None,
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SiT + REPA loss for given draws: (denoising + proj_coeff * projection loss, {'denoising', 'proj_loss'}).

    z: data latents (x1), noise: x0, t: times (B,), targets: teacher tokens (B, N, z_dim).
    """
    xt, ut = interpolant.interpolate(t, noise, z)
    out, z_tilde = model.apply_aligned(params, xt, t, y, encoder_depth, drop_key=drop_key)
    denoising = jnp.mean(mean_flat(jnp.square(out[..., : z.shape[-1]] - ut)))  # the velocity channels
    proj = repa.projection_loss([targets], [z_tilde])
    return denoising + proj_coeff * proj, {"denoising": denoising, "proj_loss": proj}


def make_loss_fn(model: FunctionalDiT, objective: str, num_timesteps: int = 1000, rescale_vb: bool = False,
                 repa_config: RepaConfig | None = None):
    """loss(params, z, y, key, train, targets=None) -> (mean loss, per-term metrics); `train` enables label
    dropout; with an enabled `repa_config` the teacher tokens `targets` are required (SiT + REPA)."""
    sched = create_schedule("", num_timesteps) if objective == "ddpm" else None
    var_type = gaussian.var_type_for(model.config.learn_sigma)
    aligned = repa_config is not None and repa_config.enabled

    def loss_fn(params: dict, z: jax.Array, y: jax.Array, key: jax.Array, train: bool = True,
                targets: jax.Array | None = None):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        drop = k_drop if train else None
        apply = lambda x, t: model.apply(params, x, t, y, drop_key=drop)
        noise = jax.random.normal(k_noise, z.shape, z.dtype)
        if objective == "ddpm":
            t = gaussian.sample_timesteps(k_t, z.shape[0], sched.num_timesteps)
            terms = gaussian.training_losses(sched, apply, z, t, noise, var_type, rescale_vb)
            metrics = {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}
            return jnp.mean(terms["loss"]), metrics
        t = interpolant.sample_time(k_t, z.shape[0])
        if aligned:
            if targets is None:
                raise ValueError("SiT + REPA loss: the teacher's tokens (targets) are missing")
            return sit_repa_loss(model, params, z, y, t, noise, targets, repa_config.encoder_depth,
                                 repa_config.proj_coeff, drop)
        return jnp.mean(interpolant.training_loss(apply, z, t, noise)), {}

    return loss_fn


def teacher_targets(teacher: Teacher, images: jax.Array, model: FunctionalDiT) -> jax.Array:
    """The teacher's patch tokens of uint8 crops at the input size whose patch grid is the model's token grid
    (REPA's 224 px for SiT/2 on 256 px images), outside the gradient."""
    net = teacher.model()
    size = repa.teacher_input_size(model.config.input_size // model.config.patch_size, net.config.patch_size)
    return repa.teacher_features(net, images, size)


def make_train_step(
    model: FunctionalDiT,
    tx: optax.GradientTransformation,
    config: DiTJobConfig,
    mesh: Mesh,
    shardings: TrainState,
    teacher_shardings: Teacher | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """jit (state, batch, key, factors) -> (state, metrics) with the state donated and kept in its shardings;
    `factors` is `latent_factors(scale, shift)` of the latent cache.

    With REPA and `teacher_shardings` the step is (state, batch, key, factors, teacher): the teacher (in
    those shardings, not donated) encodes batch['image']. With REPA and no teacher, every batch must carry the
    targets as 'teacher_features' (B, N, z_dim): precomputed features (the ahead-of-time benchmark compares
    that data path with the teacher's).
    """
    loss_fn = make_loss_fn(model, config.objective, config.diffusion.num_timesteps, config.diffusion.rescale_vb,
                           config.repa)
    decay = float(config.ema_decay)
    sample_posterior = bool(config.latents.sample_posterior)
    aligned = config.repa.enabled

    def step(state: TrainState, batch: Batch, key: jax.Array, factors: jax.Array, teacher: Teacher | None = None,
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        k_z, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        z = latents_from_batch(batch, k_z, factors[0], factors[1], sample_posterior)
        targets = None
        if aligned:
            if teacher is not None:
                targets = teacher_targets(teacher, batch["image"], model)
            elif "teacher_features" in batch:
                targets = batch["teacher_features"]
            else:
                raise ValueError("SiT + REPA step without a teacher needs batch['teacher_features']")
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, z, batch["label"], k_loss,
                                                                         True, targets)
        ok = jnp.isfinite(loss) & all_finite(grads)

        def update() -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(state.step, params, ema_update(state.ema, params, decay), opt_state)

        new = update_if(ok, update, state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "nonfinite": 1.0 - ok.astype(jnp.float32),
                   **terms}
        return new.replace(step=state.step + 1), metrics

    rep = replicated(mesh)
    in_shardings = (shardings, batch_sharding(mesh), rep, rep)
    if teacher_shardings is not None:
        in_shardings += (teacher_shardings,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, rep), donate_argnums=(0,))
