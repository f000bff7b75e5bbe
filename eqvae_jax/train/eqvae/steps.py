"""The jitted generator and discriminator updates of the EQ fine-tuning job (pure functions of the train state),
for both autoencoder families: the `StepSpec` carries the family (its objective and its D-step forward, see
family.py) and the family's loss config, so one code path serves a KL autoencoder and a VQGAN.

Each is compiled once per static `BranchPlan` (branch + scale bucket, see losses/equivariance.py) with explicit
in/out shardings on the ('data','fsdp') mesh and the train state donated; the rotation and all randomness are
traced. A step whose loss or gradients are not finite is not applied (its optimizer and network state stay
as they were; the metric `g/nonfinite` or `d/nonfinite` is 1; see train/guard.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from eqvae_jax.losses import autoencoder, equivariance, vq
from eqvae_jax.memo import cached_when_hashable
from eqvae_jax.parallel.mesh import batch_sharding, param_shardings, replicated
from eqvae_jax.train.ema import ema_update
from eqvae_jax.train.eqvae.config import FinetuneConfig
from eqvae_jax.train.eqvae.family import Family, family_of
from eqvae_jax.train.eqvae.networks import Networks
from eqvae_jax.train.eqvae.state import EQVAEState, adam, create_state
from eqvae_jax.train.guard import all_finite, update_if


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """One of the two optimizers, as values (a hashable part of the spec; `transform()` builds the optax one)."""

    lr: float
    b1: float
    b2: float
    eps: float
    accumulate: int

    def transform(self) -> optax.GradientTransformation:
        return adam(self.lr, self.b1, self.b2, self.eps, self.accumulate)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static ingredients of both steps. Hashable and compared by value, so that equal specs share their jitted
    steps (`compile_steps`)."""

    vae_graph: nnx.GraphDef
    disc_graph: nnx.GraphDef
    lpips_graph: nnx.GraphDef | None
    family: Family
    loss: autoencoder.LossConfig | vq.VQLossConfig  # the family's objective
    adam_g: AdamSettings
    adam_d: AdamSettings
    accumulate: int
    ema_decay: float | None
    return_pair: bool  # the generator step also returns (target, reconstruction) for a 'shared' D step

    @property
    def tx_g(self) -> optax.GradientTransformation:
        return self.adam_g.transform()

    @property
    def tx_d(self) -> optax.GradientTransformation:
        return self.adam_d.transform()


def make_spec(config: FinetuneConfig, nets: Networks) -> StepSpec:
    """The static ingredients of both steps for a config: graphs, the model family, loss weights (the adaptive
    weight's groups resolved: 0 = the discriminator's BatchNorm groups), the two Adams, accumulation."""
    o = config.optim
    groups = config.loss.adaptive_weight_groups or nets.disc_stats_groups
    return StepSpec(
        vae_graph=nets.vae_graph, disc_graph=nets.disc_graph, lpips_graph=nets.lpips_graph,
        family=family_of(config.model.kind), loss=dataclasses.replace(config.loss, adaptive_weight_groups=groups),
        adam_g=AdamSettings(config.learning_rate, o.b1, o.b2, o.eps, o.accumulate),
        adam_d=AdamSettings(config.learning_rate, o.b1, o.b2, o.eps, o.accumulate),
        accumulate=o.accumulate, ema_decay=config.ema.decay if config.ema.enabled else None,
        return_pair=config.d_step_transform == "shared",
    )


def initial_state(spec: StepSpec, vae_params: nnx.State, disc_params: nnx.State, disc_stats: nnx.State,
                  ) -> EQVAEState:
    """The train state at step 0 (under `jax.eval_shape`, from abstract networks, too)."""
    return create_state(vae_params, disc_params, disc_stats, spec.tx_g, spec.tx_d, spec.ema_decay is not None)


def _lpips_fn(spec: StepSpec, lpips_state: nnx.State | None) -> Callable[..., jax.Array]:
    if spec.lpips_graph is None:
        return lambda x, y, dropout_key=None: jnp.zeros((x.shape[0],), jnp.float32)
    model = nnx.merge(spec.lpips_graph, lpips_state)
    return lambda x, y, dropout_key=None: model(x, y, dropout_key=dropout_key)


def _update_fields(state: EQVAEState, ok: jax.Array, update: Callable[[], dict[str, Any]],
                   names: tuple[str, ...]) -> EQVAEState:
    """`state` with the fields `names` replaced by `update()`'s values if `ok`, else as they were (the update is
    computed only in the guard's taken branch, train/guard.py)."""
    return state.replace(**update_if(ok, update, {name: getattr(state, name) for name in names}))


def generator_grads(
    spec: StepSpec,
    state: EQVAEState,
    lpips_state: nnx.State | None,
    images: jax.Array,
    rot_k: jax.Array,
    key: jax.Array,
    plan: equivariance.BranchPlan,
) -> tuple[nnx.State, dict[str, jax.Array], tuple[jax.Array, jax.Array], nnx.State]:
    """(gradients w.r.t. the autoencoder, loss terms, (target, reconstruction), D's new BatchNorm statistics) of
    one generator micro-step on the branch `plan`; D runs in train mode on the fake batch, as in the reference.

    The loss terms include the per-group adaptive weights `d_weight_groups` (see losses/autoencoder.py) and, for
    a VQGAN, the `code_counts` of the quantized (transformed) features.
    """
    lpips = _lpips_fn(spec, lpips_state)
    update_step = state.step // spec.accumulate

    def loss_fn(vae_params):
        vae = nnx.merge(spec.vae_graph, vae_params, copy=True)
        disc = nnx.merge(spec.disc_graph, state.disc, state.disc_stats, copy=True)
        total, terms, pair = spec.family.generator_loss(
            vae, lpips, disc, images, plan, rot_k, key, update_step, spec.loss
        )
        return total, (terms, pair, nnx.state(disc, nnx.BatchStat))

    (_, (terms, pair, disc_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.vae)
    return grads, terms, pair, disc_stats


def generator_step(
    spec: StepSpec,
    state: EQVAEState,
    lpips_state: nnx.State | None,
    images: jax.Array,
    rot_k: jax.Array,
    key: jax.Array,
    plan: equivariance.BranchPlan,
) -> tuple[EQVAEState, dict[str, jax.Array], tuple[jax.Array, jax.Array] | None]:
    """One autoencoder micro-step: `generator_grads`, the optimizer update, the EMA and the non-finite guard.

    Metrics: the scalar loss terms as g/<term>, the family's summed terms (arrays, e.g. g/code_counts, which the
    job sums over each log interval), g/grad_norm and g/nonfinite.
    """
    grads, terms, pair, disc_stats = generator_grads(spec, state, lpips_state, images, rot_k, key, plan)
    ok = jnp.isfinite(terms["total"]) & all_finite(grads)

    def update() -> dict[str, Any]:
        updates, opt_g = spec.tx_g.update(grads, state.opt_g, state.vae)
        vae = optax.apply_updates(state.vae, updates)
        new = {"vae": vae, "opt_g": opt_g, "disc_stats": disc_stats}
        if spec.ema_decay is not None:
            # Did this micro-step apply an optimizer update? (MultiSteps: its mini-step counter wrapped to 0.)
            updated = opt_g.mini_step == 0 if spec.accumulate > 1 else jnp.asarray(True)
            new["ema"] = ema_update(state.ema, vae, jnp.where(updated, spec.ema_decay, 1.0))
        return new

    names = ("vae", "opt_g", "disc_stats") + (("ema",) if spec.ema_decay is not None else ())
    new_state = _update_fields(state, ok, update, names).replace(step=state.step + 1)
    metrics = {f"g/{k}": v for k, v in terms.items() if v.ndim == 0 or k in spec.family.summed_terms}
    metrics["g/grad_norm"] = optax.global_norm(grads)
    metrics["g/nonfinite"] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics, (pair if spec.return_pair else None)


def discriminator_grads(
    spec: StepSpec,
    state: EQVAEState,
    images: jax.Array,
    rot_k: jax.Array,
    key: jax.Array,
    pair: tuple[jax.Array, jax.Array] | None,
    plan: equivariance.BranchPlan,
) -> tuple[nnx.State, dict[str, jax.Array], nnx.State]:
    """(gradients w.r.t. D, loss terms, D's new BatchNorm statistics) of one discriminator micro-step: a fresh
    transformed forward of the (fixed) autoencoder, unless `pair` is given ('shared' mode), then the hinge loss
    on D(real) and D(fake) as two train-mode calls. Call it after the generator step of the same micro-step
    (which advanced `state.step`)."""
    if pair is None:
        vae = nnx.merge(spec.vae_graph, state.vae)
        target, recon = spec.family.reconstruct(vae, images, plan, rot_k, key)
    else:
        target, recon = pair
    target, recon = jax.lax.stop_gradient(target), jax.lax.stop_gradient(recon)
    update_step = (state.step - 1) // spec.accumulate  # the generator step already advanced `step`

    def loss_fn(disc_params):
        disc = nnx.merge(spec.disc_graph, disc_params, state.disc_stats, copy=True)
        loss, terms = autoencoder.discriminator_loss(disc, target, recon, update_step, spec.loss)
        return loss, (terms, nnx.state(disc, nnx.BatchStat))

    (_, (terms, disc_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.disc)
    return grads, terms, disc_stats


def discriminator_step(
    spec: StepSpec,
    state: EQVAEState,
    images: jax.Array,
    rot_k: jax.Array,
    key: jax.Array,
    pair: tuple[jax.Array, jax.Array] | None,
    plan: equivariance.BranchPlan,
) -> tuple[EQVAEState, dict[str, jax.Array]]:
    """One discriminator micro-step: `discriminator_grads`, the optimizer update and the non-finite guard.

    The step counter is not advanced here: the generator step owns it (one G + one D call per micro-step).
    """
    grads, terms, disc_stats = discriminator_grads(spec, state, images, rot_k, key, pair, plan)
    ok = jnp.isfinite(terms["disc_loss"]) & all_finite(grads)

    def update() -> dict[str, Any]:
        updates, opt_d = spec.tx_d.update(grads, state.opt_d, state.disc)
        return {"disc": optax.apply_updates(state.disc, updates), "opt_d": opt_d, "disc_stats": disc_stats}

    new_state = _update_fields(state, ok, update, ("disc", "opt_d", "disc_stats"))
    metrics = {f"d/{k}": v for k, v in terms.items()}
    metrics["d/nonfinite"] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics


@dataclasses.dataclass
class CompiledSteps:
    """The two jitted steps with their shardings; call with a static plan (one compilation per plan)."""

    generator: Callable[..., Any]
    discriminator: Callable[..., Any]
    state_sharding: Any


def compile_steps(spec: StepSpec, state: EQVAEState, lpips_state: nnx.State | None, mesh: Mesh) -> CompiledSteps:
    """jit both steps with explicit shardings: small tensors replicated, large ones by the default FSDP rule
    (pure data parallel when fsdp == 1), the batch split over the mesh, the state donated. The jitted pair is
    kept per (spec, mesh, shardings) in the process: another run of the same steps in it (a resumed or repeated
    run, the replication's control arm) reuses JAX's traces and programs instead of tracing and lowering again."""
    s_sh = param_shardings(state, mesh)
    l_sh = jax.tree.map(lambda _: replicated(mesh), lpips_state) if lpips_state is not None else None
    (s_leaves, s_def), (l_leaves, l_def) = jax.tree.flatten(s_sh), jax.tree.flatten(l_sh)
    return _jitted_steps(spec, mesh, tuple(s_leaves), s_def, tuple(l_leaves), l_def)


@cached_when_hashable(maxsize=8)  # a module with an unhashable static attribute: jitted afresh
def _jitted_steps(spec: StepSpec, mesh: Mesh, s_leaves: tuple, s_def: Any, l_leaves: tuple, l_def: Any
                  ) -> CompiledSteps:
    s_sh, l_sh = jax.tree.unflatten(s_def, s_leaves), jax.tree.unflatten(l_def, l_leaves)
    b_sh = batch_sharding(mesh)
    rep = replicated(mesh)
    pair_sh = (b_sh, b_sh) if spec.return_pair else None
    gen = jax.jit(
        functools.partial(generator_step, spec),
        static_argnums=(5,),
        in_shardings=(s_sh, l_sh, b_sh, rep, rep),
        out_shardings=(s_sh, rep, pair_sh),
        donate_argnums=(0,),
    )
    disc = jax.jit(
        functools.partial(discriminator_step, spec),
        static_argnums=(5,),
        in_shardings=(s_sh, b_sh, rep, rep, pair_sh),
        out_shardings=(s_sh, rep),
        donate_argnums=(0,),
    )
    return CompiledSteps(gen, disc, s_sh)
