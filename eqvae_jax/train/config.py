"""Config sections every training job shares, and the checks they share.

A job's schema is a frozen dataclass that inherits `RunConfig` (seed, length, mesh, logging, checkpoints,
non-finite policy, compilation cache, profiling) and adds its own sections. Every count of training progress is in
optimizer updates (`*_updates`); a job with gradient accumulation runs several micro-steps per update.
"""

from __future__ import annotations

import dataclasses

from etils import epath

from eqvae_jax.parallel.mesh import mesh_shape
from eqvae_jax.typed_config import positive


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """('data', 'fsdp') axis sizes: positive, -1 = all remaining devices, data 0 = one group per TPU slice."""

    data: int = -1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_updates: int = 1000
    max_to_keep: int = 3  # keep the last N checkpoints ...
    keep_every: int = 0  # ... plus every update divisible by this (0 = none)
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_updates: int = 50  # one console line + TensorBoard scalars per this many updates


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Compiling a job's step variants (jobs with one program per static plan, such as the EQ-VAE job)."""

    ahead: bool = True  # compile every program the run will need at start-up, in the order it needs them
    workers: int = 0  # compile threads for `ahead`; 0 = the host's CPU count, at most 16


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A jax.profiler trace of `num_updates` updates from `first_update` on, in WORKDIR/profile (process 0)."""

    first_update: int = 10  # the first update traced (counting from 1; later than the first compiles)
    num_updates: int = 0  # updates traced; 0 = off


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields of every training job (subclasses add theirs; all fields have defaults)."""

    trainer: str = ""
    seed: int = 0
    total_updates: int = 1
    global_batch_size: int = 256  # images (or latents) per micro-step over all hosts
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    max_consecutive_nonfinite: int = 20  # stop after this many consecutive steps skipped for NaN/Inf
    compilation_cache_dir: str = ""  # '' = WORKDIR/jax_cache; may be gs://..., shared by workers and restarts
    compile: CompileConfig = CompileConfig()
    profile: ProfileConfig = ProfileConfig()


def run_problems(config: RunConfig, num_devices: int, slices: int = 1) -> list[str]:
    """What is wrong with the shared fields for `num_devices` devices (empty list when nothing)."""
    problems = positive(("global_batch_size", config.global_batch_size), ("total_updates", config.total_updates),
                        ("log.every_updates", config.log.every_updates),
                        ("checkpoint.every_updates", config.checkpoint.every_updates),
                        ("max_consecutive_nonfinite", config.max_consecutive_nonfinite))
    try:
        data, fsdp = mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp, slices)
        if config.global_batch_size > 0 and config.global_batch_size % (data * fsdp):
            problems.append(f"global_batch_size={config.global_batch_size} is not divisible by the "
                            f"{data * fsdp} batch shards (mesh data={data} x fsdp={fsdp})")
    except ValueError as e:
        problems.append(str(e))
    if config.profile.num_updates < 0:
        problems.append("profile.num_updates must be >= 0 (0 = off)")
    if config.profile.first_update < 1:
        problems.append("profile.first_update must be >= 1 (updates count from 1)")
    elif config.profile.num_updates > 0 and config.profile.first_update > config.total_updates:
        problems.append(f"profile.first_update={config.profile.first_update} is after total_updates="
                        f"{config.total_updates}: nothing would be traced")
    if config.compile.workers < 0:
        problems.append("compile.workers must be >= 0 (0 = the host's CPU count, at most 16)")
    return problems


def weights_dir_problem(name: str, path: str, required: bool = True) -> str | None:
    """Why `path` is not a converted weights dir (None when it is, or when it is empty and optional)."""
    if not path:
        return f"{name} is empty: give a converted Flax weights dir (python -m eqvae_jax.convert)" if required else None
    if not epath.Path(path, "config.json").is_file():  # local or gs://
        return f"{name}={path!r} is not a converted weights dir (no config.json there)"
    return None
