"""The jitted DiT/SiT train step: sample z from the cached posterior, diffusion/flow loss, AdamW, EMA.

All randomness of step s comes from fold_in(key, s), so an interrupted and resumed run draws exactly what an
uninterrupted one draws. A step whose loss, gradients or new params are not finite is not applied (the
step counter still advances with the data); the metric `nonfinite` reports it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from eqvae_jax.diffusion import gaussian, interpolant
from eqvae_jax.diffusion.schedule import create_schedule
from eqvae_jax.models.dit import FunctionalDiT
from eqvae_jax.models.kl_vae import normalize_latents
from eqvae_jax.parallel.mesh import batch_sharding, replicated
from eqvae_jax.train.dit.config import DiTJobConfig
from eqvae_jax.train.dit.state import TrainState
from eqvae_jax.train.ema import ema_update
from eqvae_jax.train.guard import all_finite, select

Batch = dict[str, jax.Array]


def latents_from_batch(batch: Batch, key: jax.Array, scale: float, shift: float, sample: bool) -> jax.Array:
    """z = mean + std * eps (or the mean), mapped to diffusion scale: (z - shift) * scale."""
    z = batch["mean"]
    if sample:
        z = z + batch["std"] * jax.random.normal(key, z.shape, z.dtype)
    return normalize_latents(z, scale, shift)


def make_loss_fn(model: FunctionalDiT, objective: str, num_timesteps: int = 1000, rescale_vb: bool = False):
    """loss(params, z, y, key, train) -> (mean loss, per-term metrics); `train` enables label dropout."""
    sched = create_schedule("", num_timesteps) if objective == "ddpm" else None
    var_type = gaussian.var_type_for(model.config.learn_sigma)

    def loss_fn(params: dict, z: jax.Array, y: jax.Array, key: jax.Array, train: bool = True):
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
        return jnp.mean(interpolant.training_loss(apply, z, t, noise)), {}

    return loss_fn


def make_train_step(
    model: FunctionalDiT,
    tx: optax.GradientTransformation,
    config: DiTJobConfig,
    scale: float,
    shift: float,
    mesh: Mesh,
    shardings: TrainState,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """jit (state, batch, key) -> (state, metrics) with the state donated and kept in its shardings."""
    loss_fn = make_loss_fn(model, config.objective, config.diffusion.num_timesteps, config.diffusion.rescale_vb)
    decay = float(config.ema_decay)
    sample_posterior = bool(config.latents.sample_posterior)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        k_z, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        z = latents_from_batch(batch, k_z, scale, shift, sample_posterior)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, z, batch["label"], k_loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, decay)
        ok = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
        new = select(ok, TrainState(state.step, params, ema, opt_state), state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "nonfinite": 1.0 - ok.astype(jnp.float32),
                   **terms}
        return new.replace(step=state.step + 1), metrics

    rep = replicated(mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
