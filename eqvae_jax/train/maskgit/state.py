"""MaskGIT train state (step, params, AdamW state, optional EMA), its FSDP shardings, and its creation.

Params are plain nested dicts (`nnx.State.to_pure_dict()`), so the state is a simple pytree for jit and Orbax.
Sharding is the rule table of parallel/mesh.py over the whole state: every large tensor is FSDP-sharded over
'fsdp' along its largest divisible dimension, except the scanned blocks' leading depth axis (`SCANNED_LAYERS`);
optimizer moments and the EMA follow their params because they hold the same paths. The initial weights are
drawn on the host with numpy (the reference's PyTorch init, `models.maskgit.build`), identically on every host,
and each device receives only its shards (`jax.make_array_from_callback`), so a multi-host run needs no
broadcast and a device never holds the whole model.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from eqvae_jax.models import maskgit
from eqvae_jax.parallel.mesh import SCANNED_LAYERS, param_shardings
from eqvae_jax.train.maskgit.config import OptimConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]
    opt_state: Any
    ema: dict[str, Any] | None  # None when the run keeps no EMA (v1)


def learning_rate(o: OptimConfig) -> optax.Schedule:
    """v1's warm-up: lr * update / warmup_updates from 0 (the first update has lr 0), then constant lr. (v1 stops
    adapting at update warmup - 1 and so keeps lr * 2499 / 2500 afterwards; here the constant is lr itself.)"""
    if o.warmup_updates <= 0:
        return optax.constant_schedule(o.lr)
    return optax.linear_schedule(0.0, o.lr, o.warmup_updates)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the warm-up schedule (decay on every parameter, as v1)."""
    tx = optax.adamw(learning_rate(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def state_shardings(state: Any, mesh: Mesh, min_size: int) -> Any:
    """Shardings for a TrainState (or any tree holding MaskGIT params under their own paths)."""
    return param_shardings(state, mesh, SCANNED_LAYERS, fsdp_min_size=min_size)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)


def _abstract(cfg: maskgit.MaskGITConfig, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    params = _shapes(maskgit.functional(maskgit.abstract(cfg))[1])
    opt_state = jax.eval_shape(tx.init, params)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state, params if ema else None)


def abstract_state(cfg: maskgit.MaskGITConfig, tx: optax.GradientTransformation, mesh: Mesh, min_size: int,
                   ema: bool) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings: a restore or ahead-of-time compile target."""
    abstract = _abstract(cfg, tx, ema)
    shardings = state_shardings(abstract, mesh, min_size)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def functional_model(cfg: maskgit.MaskGITConfig) -> maskgit.FunctionalMaskGIT:
    """The static half of the model (graph definition; MaskGIT has no non-trainable variables)."""
    return maskgit.functional(maskgit.abstract(cfg))[0]


def host_params(cfg: maskgit.MaskGITConfig, seed: int) -> dict[str, Any]:
    """The initial params as a nested dict of numpy arrays (`maskgit.init_values`: nothing on a device)."""
    nested: dict[str, Any] = {}
    for key, value in maskgit.init_values(cfg, seed).items():
        *parents, leaf = key.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    want = jax.tree.structure(_shapes(maskgit.functional(maskgit.abstract(cfg))[1]))
    if jax.tree.structure(nested) != want:
        raise ValueError(f"MaskGIT init: the drawn values' tree {jax.tree.structure(nested)} is not the params' {want}")
    return nested


def _place(host: Any, shardings: Any) -> Any:
    """Host numpy arrays (identical on every process) onto their shardings, each device fed its own shard."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
                        host, shardings)


def create(cfg: maskgit.MaskGITConfig, seed: int, tx: optax.GradientTransformation, mesh: Mesh, min_size: int,
           ema: bool) -> tuple[maskgit.FunctionalMaskGIT, TrainState, TrainState]:
    """(model, state, shardings): the reference's init drawn on the host, placed shard by shard; the optimizer
    state (and the EMA, a copy of the params) initialised on the devices in their shardings."""
    shardings = state_shardings(_abstract(cfg, tx, ema), mesh, min_size)
    params = _place(host_params(cfg, seed), shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(params) if ema else None
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return functional_model(cfg), TrainState(step, params, opt_state, copy), shardings
