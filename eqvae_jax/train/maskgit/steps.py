"""The jitted MaskGIT train step: mask the cached tokens, drop labels, cross-entropy, clip + AdamW, EMA, guard.

One step is valeoai v1's update (`maskgit.loss.training_loss`: schedule-drawn ratio, per-token Bernoulli mask,
10% label drop, dropout, label-smoothed cross-entropy over all or the masked tokens). All randomness of step s
comes from fold_in(key, s), so an interrupted and resumed run draws exactly what an uninterrupted one draws. A
step whose loss, gradients or new params are not finite is not applied (the step counter still advances with
the data); the metric `nonfinite` reports it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from eqvae_jax.maskgit.loss import training_loss
from eqvae_jax.models.maskgit import FunctionalMaskGIT
from eqvae_jax.parallel.mesh import batch_sharding, replicated
from eqvae_jax.train.ema import ema_update
from eqvae_jax.train.guard import all_finite, update_if
from eqvae_jax.train.maskgit.config import MaskGITJobConfig
from eqvae_jax.train.maskgit.state import TrainState, learning_rate

Batch = dict[str, jax.Array]


def make_loss_fn(model: FunctionalMaskGIT, config: MaskGITJobConfig):
    """loss(params, tokens (B, g, g), labels (B,), key) -> (loss, {'accuracy', 'masked_accuracy', 'mask_ratio'})."""
    objective = config.objective.objective()
    mask_id = model.config.mask_id

    def loss_fn(params: dict, tokens: jax.Array, labels: jax.Array, key: jax.Array):
        apply = lambda *a, **kw: model.apply(params, *a, **kw)
        loss, metrics = training_loss(apply, tokens, labels, key, mask_id, objective)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    return loss_fn


def make_train_step(
    model: FunctionalMaskGIT,
    tx: optax.GradientTransformation,
    config: MaskGITJobConfig,
    mesh: Mesh,
    shardings: TrainState,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """jit (state, {'tokens', 'label'}, key) -> (state, metrics) with the state donated and kept in its
    shardings. Metrics: loss, accuracy, masked_accuracy, mask_ratio, grad_norm (before clipping), lr, nonfinite."""
    loss_fn = make_loss_fn(model, config)
    schedule = learning_rate(config.optim)
    decay = float(config.ema.decay)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        k = jax.random.fold_in(key, state.step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch["tokens"],
                                                                         batch["label"], k)
        ok = jnp.isfinite(loss) & all_finite(grads)

        def update() -> TrainState:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = None if state.ema is None else ema_update(state.ema, params, decay)
            return TrainState(state.step, params, opt_state, ema)

        new = update_if(ok, update, state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   "nonfinite": 1.0 - ok.astype(jnp.float32), **terms}
        return new.replace(step=state.step + 1), metrics

    rep = replicated(mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
