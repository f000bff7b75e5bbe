"""DiT/SiT train state (step, params, EMA params, AdamW state), its FSDP shardings, and sharded init.

Params are plain nested dicts (`nnx.State.to_pure_dict()`), so the state is a simple pytree for jit and
Orbax. Sharding (architecture.md §3): every large tensor is FSDP-sharded over 'fsdp' along its largest
divisible dimension; the transformer blocks are stacked for lax.scan, so their leading depth axis is never
sharded (each scan iteration slices it) and the rule picks among the remaining dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from eqvae_jax.models.dit import DiT, DiTConfig
from eqvae_jax.parallel.mesh import fsdp_spec, param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    ema: dict[str, Any]
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Model:
    """The static half of the model: graph definition and its non-trainable variables (pos_embed)."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    config: DiTConfig

    def apply(self, params: dict[str, Any], x: jax.Array, t: jax.Array, y: jax.Array, **kw: Any) -> jax.Array:
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)(x, t, y, **kw)


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    tx = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def _split(cfg: DiTConfig, seed: int) -> tuple[nnx.GraphDef, dict[str, Any], nnx.State]:
    graphdef, params, rest = nnx.split(DiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest


def dit_param_shardings(params: Any, mesh: Mesh, min_size: int) -> Any:
    """FSDP shardings for DiT params: blocks/* skip their leading (scanned) depth axis."""
    fsdp = mesh.shape["fsdp"]

    def block_rule(path: tuple, leaf: Any) -> NamedSharding | None:
        if getattr(path[0], "key", None) != "blocks" or len(leaf.shape) < 2:
            return None
        if math.prod(leaf.shape) < min_size:
            return NamedSharding(mesh, PartitionSpec())
        spec = fsdp_spec(tuple(leaf.shape[1:]), fsdp, 0)
        return NamedSharding(mesh, PartitionSpec(None, *spec))

    base = param_shardings(params, mesh, fsdp_min_size=min_size)
    return jax.tree_util.tree_map_with_path(lambda p, x, s: block_rule(p, x) or s, params, base)


def state_shardings(abstract: TrainState, mesh: Mesh, tx: optax.GradientTransformation, min_size: int) -> TrainState:
    """Shardings of the whole train state: opt moments follow their params, counters are replicated."""
    ps = dit_param_shardings(abstract.params, mesh, min_size)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, ps,
                                transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=ps, ema=ps, opt_state=opt)


def _init_fn(cfg: DiTConfig, config: ConfigDict, tx: optax.GradientTransformation):
    def init() -> tuple[TrainState, nnx.State]:
        _, params, rest = _split(cfg, config.seed)
        ema = jax.tree.map(jnp.copy, params)
        return TrainState(jnp.zeros((), jnp.int32), params, ema, tx.init(params)), rest

    return init


def create(cfg: DiTConfig, config: ConfigDict, mesh: Mesh) -> tuple[Model, TrainState, TrainState]:
    """(model, state, shardings): params initialised directly into their shardings (no host copy)."""
    tx = make_optimizer(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(config.seed))))
    init = _init_fn(cfg, config, tx)
    abstract, abstract_rest = jax.eval_shape(init)
    shardings = state_shardings(abstract, mesh, tx, config.fsdp_min_size)
    rest_shardings = jax.tree.map(lambda _: replicated(mesh), abstract_rest)
    state, rest = jax.jit(init, out_shardings=(shardings, rest_shardings))()
    return Model(graphdef, rest, cfg), state, shardings


def create_abstract(cfg: DiTConfig, config: ConfigDict, mesh: Mesh) -> tuple[Model, TrainState]:
    """(model, state of ShapeDtypeStructs carrying shardings): the restore target, nothing allocated
    but the small non-trainable variables."""
    tx = make_optimizer(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(config.seed))))
    init = _init_fn(cfg, config, tx)
    abstract, _ = jax.eval_shape(init)
    shardings = state_shardings(abstract, mesh, tx, config.fsdp_min_size)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rest = jax.jit(lambda: init()[1], out_shardings=replicated(mesh))()
    return Model(graphdef, rest, cfg), target
