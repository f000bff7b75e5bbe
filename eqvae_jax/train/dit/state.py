"""DiT/SiT train state (step, params, EMA params, AdamW state), its FSDP shardings, and sharded init; the frozen
REPA teacher.

Params are plain nested dicts (`nnx.State.to_pure_dict()`), so the state is a simple pytree for jit and Orbax.
Sharding is the rule table of parallel/mesh.py: every large tensor is FSDP-sharded over 'fsdp' along its
largest divisible dimension, except the scanned blocks' leading depth axis (`SCANNED_LAYERS`); EMA copies and
optimizer moments follow their params because they hold the same paths. With REPA the projector is part of
the model's params (`params['projector']`), so it is trained, EMA'd and sharded with them. The teacher is not
part of the state: its Frozen weights are a separate input of the step, replicated (346 MB float32 for
DINOv2-B/14, 2% of a v5e chip) or FSDP-sharded like the model (`repa.teacher_sharding='fsdp'`, for ViT-L/g).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from eqvae_jax.models import dinov2, dit
from eqvae_jax.parallel.mesh import SCANNED_LAYERS, param_shardings, replicated
from eqvae_jax.train.dit.config import OptimConfig, RepaConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    ema: dict[str, Any]
    opt_state: Any


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    tx = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def state_shardings(state: Any, mesh: Mesh, min_size: int) -> Any:
    """Shardings for a TrainState (or any tree holding DiT params under their own paths)."""
    return param_shardings(state, mesh, SCANNED_LAYERS, fsdp_min_size=min_size)


def _init_fn(cfg: dit.DiTConfig, seed: int, tx: optax.GradientTransformation):
    def init() -> tuple[TrainState, Any]:
        handle, params = dit.functional(dit.build(cfg, seed=seed))
        return TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params)), \
            handle.rest

    return init


def create(cfg: dit.DiTConfig, seed: int, tx: optax.GradientTransformation, mesh: Mesh, min_size: int,
           ) -> tuple[dit.FunctionalDiT, TrainState, TrainState]:
    """(model, state, shardings): params initialised directly into their shardings (no host copy)."""
    init = _init_fn(cfg, seed, tx)
    abstract, abstract_rest = jax.eval_shape(init)
    shardings = state_shardings(abstract, mesh, min_size)
    rest_shardings = jax.tree.map(lambda _: replicated(mesh), abstract_rest)
    state, rest = jax.jit(init, out_shardings=(shardings, rest_shardings))()
    return dit.FunctionalDiT(dit.functional(dit.abstract(cfg))[0].graphdef, rest, cfg), state, shardings


def abstract_state(cfg: dit.DiTConfig, seed: int, tx: optax.GradientTransformation, mesh: Mesh, min_size: int,
                   ) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings: a restore or ahead-of-time compile target."""
    abstract, _ = jax.eval_shape(_init_fn(cfg, seed, tx))
    shardings = state_shardings(abstract, mesh, min_size)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@flax.struct.dataclass
class Teacher:
    """The frozen REPA teacher as a pytree (a jitted step's input): `model()` rebuilds the DINOv2 inside."""

    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    state: dict[str, Any]  # Frozen weights as a plain dict: never differentiated or updated

    def model(self) -> dinov2.DINOv2:
        return nnx.merge(self.graphdef, nnx.State(self.state))


def teacher_shardings(state: Any, mesh: Mesh, sharding: str, min_size: int) -> Any:
    """Replicated, or FSDP over the rule table (the stacked blocks' depth axis kept whole)."""
    if sharding == "fsdp":
        return param_shardings(state, mesh, SCANNED_LAYERS, fsdp_min_size=min_size)
    return jax.tree.map(lambda _: replicated(mesh), state)


def create_teacher(r: RepaConfig, cfg: dinov2.DINOv2Config, mesh: Mesh, min_size: int, seed: int = 0,
                   ) -> tuple[Teacher, Teacher]:
    """(teacher on the mesh, its shardings): loaded from `r.teacher`, or random (host numpy init) for 'random'."""
    model = dinov2.build(cfg, seed=seed) if r.teacher == "random" else dinov2.load(r.teacher,
                                                                              compute_dtype=cfg.compute_dtype)
    graphdef, state = nnx.split(model)
    state = jax.device_get(state.to_pure_dict())
    shardings = teacher_shardings(state, mesh, r.teacher_sharding, min_size)
    return Teacher(graphdef, jax.device_put(state, shardings)), Teacher(graphdef, shardings)


def abstract_teacher(cfg: dinov2.DINOv2Config, mesh: Mesh, sharding: str, min_size: int) -> Teacher:
    """The teacher with ShapeDtypeStructs carrying their shardings (an ahead-of-time compile input)."""
    graphdef, state = nnx.split(dinov2.abstract(cfg))
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state.to_pure_dict())
    shardings = teacher_shardings(state, mesh, sharding, min_size)
    return Teacher(graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          state, shardings))


def functional_model(cfg: dit.DiTConfig, seed: int, sharding: Any = None) -> dit.FunctionalDiT:
    """The static half of the model; its non-trainable variables (the fixed position table) are computed by a
    program that XLA prunes of the parameter init, so nothing large is allocated."""
    init = _init_fn(cfg, seed, optax.identity())
    rest = jax.jit(lambda: init()[1], out_shardings=sharding)()
    return dit.FunctionalDiT(dit.functional(dit.abstract(cfg))[0].graphdef, rest, cfg)
