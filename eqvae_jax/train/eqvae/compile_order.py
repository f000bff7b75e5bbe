"""The EQ-VAE job's step programs in the order the run will first need them, for the compile pool.

The transform sampler is seeded and its state is checkpointed, so the future draws are known: a copy of it
replays them (the job's own sampler does not advance) with the job's draw rules (plain during pre-training,
one draw for G and another for D unless the D step reuses the generator's pair). Programs the remaining run
will never draw are not compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from eqvae_jax.losses import equivariance
from eqvae_jax.parallel.mesh import batch_sharding, replicated
from eqvae_jax.train.compile_pool import CompilePool
from eqvae_jax.train.eqvae.steps import CompiledSteps

PLAIN_PLAN = equivariance.BranchPlan(equivariance.Branch.PLAIN)
Program = tuple[str, equivariance.BranchPlan]  # ("g_step" | "d_step", plan)


def programs_in_need_order(
    transform: equivariance.TransformConfig,
    sampler_state: dict[str, Any],
    image_hw: tuple[int, int],
    micro_steps: range,
    pretrain_micro: int,
    shared_pair: bool,
) -> list[Program]:
    """Every (step, plan) the micro-steps `micro_steps` will run, in order of first use (G before D)."""
    peek = equivariance.TransformSampler(transform)
    peek.set_state(sampler_state)
    possible = len(equivariance.all_plans(transform, image_hw)) + 1  # + plain (pre-training)

    def draw(micro: int) -> equivariance.BranchPlan:
        return PLAIN_PLAN if micro < pretrain_micro else peek.draw().plan(image_hw)[0]

    order: dict[Program, None] = {}
    for micro in micro_steps:
        g = draw(micro)
        order.setdefault(("g_step", g))
        order.setdefault(("d_step", g if shared_pair else draw(micro)))
        if len(order) >= 2 * possible:
            break
    return list(order)


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a placed pytree (what `lower` needs instead of the arrays)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def submit_programs(
    pool: CompilePool,
    programs: list[Program],
    steps: CompiledSteps,
    state: Any,
    lpips_state: Any,
    mesh: Mesh,
    batch_shape: tuple[int, ...],
    returns_pair: bool,
) -> None:
    """Queue `lower(...).compile()` of each program with the argument shapes and shardings of the real calls;
    `state` and `lpips_state` are abstract (`abstract(placed)`, or ShapeDtypeStructs with shardings)."""
    rep = replicated(mesh)
    images = jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=batch_sharding(mesh))
    rot = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=rep)

    def g_args(plan: equivariance.BranchPlan) -> tuple[Any, ...]:
        return state, lpips_state, images, rot, key, plan

    def d_args(plan: equivariance.BranchPlan) -> tuple[Any, ...]:
        pair = None
        if returns_pair:
            shapes = steps.generator.eval_shape(*g_args(plan))[2]
            pair = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding(mesh)) for s in shapes)
        return state, images, rot, key, pair, plan

    def compile_fn(fn: Any, args: Callable[[equivariance.BranchPlan], tuple[Any, ...]],
                   plan: equivariance.BranchPlan) -> jax.stages.Compiled:
        return fn.lower(*args(plan)).compile()

    for name, plan in programs:
        fn, args = (steps.generator, g_args) if name == "g_step" else (steps.discriminator, d_args)
        pool.submit(name, plan, functools.partial(compile_fn, fn, args, plan))
