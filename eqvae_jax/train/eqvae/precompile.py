"""Compile-only mode of the EQ-VAE / EQ-VQGAN job: every generator and discriminator program for a TPU slice's topology,
compiled here (no TPU) with libtpu's compiler into the run's persistent compilation cache, then exit.

`launch/tpu.py precompile -- python -m eqvae_jax.main --config=... --workdir=gs://...` sets the target
(EQVAE_COMPILE_ONLY_TOPOLOGY). The programs are the job's own jitted steps with the shardings the slice's mesh
gives them, lowered from shape-only networks (the weights are not read), compiled on `compile.workers`
threads. Every (branch, scale) the sampler can draw is compiled (a resumed run may need any); the evaluation
and image-summary programs are not (one each, compiled on the slice at the first evaluation). The workdir's
checkpoints are not touched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from eqvae_jax.losses import equivariance
from eqvae_jax.parallel import aot
from eqvae_jax.parallel.mesh import batch_divisor, replicated
from eqvae_jax.storage import resolve
from eqvae_jax.train.compile_pool import CompilePool
from eqvae_jax.train.eqvae import compile_order, steps
from eqvae_jax.train.eqvae.config import disc_stats_groups, parse_config
from eqvae_jax.train.eqvae.networks import abstract_networks

log = logging.getLogger(__name__)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass(frozen=True)
class TopologyPrograms:
    """The job's G/D programs for a slice, ready to submit to a CompilePool (`submit`)."""

    config: Any  # the parsed job config
    mesh: Any
    devices: list[Any]
    programs: list[compile_order.Program]  # every (step, plan) the sampler can draw, plain included when pre-training
    cache_dir: str
    compiled: steps.CompiledSteps
    state: Any  # abstract, with the slice's shardings
    lpips_state: Any
    return_pair: bool  # the G step returns the (target, reconstruction) pair ('shared' D mode)

    def submit(self, pool: CompilePool, programs: list[compile_order.Program]) -> None:
        """Queue these programs' `lower(...).compile()` for the slice (abstract args with its shardings)."""
        image_hw = (self.config.data.image_size,) * 2
        compile_order.submit_programs(pool, programs, self.compiled, self.state, self.lpips_state, self.mesh,
                                      (self.config.global_batch_size, *image_hw, 3), self.return_pair)


def topology_programs(config: ConfigDict, workdir: str, accelerator: str) -> TopologyPrograms:
    """Shape-only networks and the jitted steps on `accelerator`'s mesh (libtpu compile-only; nothing is read)."""
    aot.prepare_environment()
    devices = aot.topology_devices(accelerator)
    config = parse_config(config, num_devices=len(devices))
    cache_dir = config.compilation_cache_dir or os.path.join(resolve(workdir), "jax_cache")
    mesh = aot.topology_mesh(devices, config.mesh.data, config.mesh.fsdp)
    nets = abstract_networks(config, disc_stats_groups(config, batch_divisor(mesh)))
    spec = steps.make_spec(config, nets)
    state = jax.eval_shape(lambda *a: steps.initial_state(spec, *a), nets.vae_params, nets.disc_params,
                           nets.disc_stats)
    compiled = steps.compile_steps(spec, state, nets.lpips_state, mesh)
    lpips_state = (_with_shardings(nets.lpips_state, jax.tree.map(lambda _: replicated(mesh), nets.lpips_state))
                   if nets.lpips_state is not None else None)
    plans = equivariance.all_plans(config.transform, (config.data.image_size,) * 2)
    if config.pretrain_updates and compile_order.PLAIN_PLAN not in plans:
        plans.append(compile_order.PLAIN_PLAN)
    programs = [(name, plan) for plan in plans for name in ("g_step", "d_step")]
    return TopologyPrograms(config, mesh, devices, programs, cache_dir, compiled,
                            _with_shardings(state, compiled.state_sharding), lpips_state, spec.return_pair)


def precompile(config: ConfigDict, workdir: str, accelerator: str) -> dict[str, Any]:
    """Compile the job's programs for `accelerator` ('v5p-8'); returns {programs, seconds, manifest}."""
    target = topology_programs(config, workdir, accelerator)
    programs, cache_dir = target.programs, target.cache_dir
    aot.enable_cache(cache_dir)
    pool = CompilePool(target.config.compile.workers, log.info)
    log.info("precompile: %d programs of the %s job for %s (%d devices, mesh %s) on %d threads into %s",
             len(programs), target.config.trainer, accelerator, len(target.devices), dict(target.mesh.shape),
             pool.workers, cache_dir)
    start = time.perf_counter()
    target.submit(pool, programs)
    for i, (name, plan) in enumerate(programs, 1):
        ready = pool.take(name, plan)
        log.info("precompile: %d/%d %s [%s] in %.1fs", i, len(programs), name, plan, ready.record.compile_s)
    seconds = time.perf_counter() - start
    pool.close()
    entries = sorted(p.name for p in epath.Path(cache_dir).iterdir()
                     if p.is_file() and not p.name.startswith(aot.MANIFEST_PREFIX))
    manifest = aot.write_manifest(accelerator, list(target.mesh.devices.flat), cache_dir, entries)
    log.info("precompile: %d programs in %.0fs; manifest %s", len(programs), seconds, manifest)
    return {"programs": len(programs), "seconds": seconds, "manifest": manifest}
