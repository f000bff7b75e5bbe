"""Multi-host start-up: whether to call `jax.distributed.initialize()`, and calling it."""

from __future__ import annotations

import os

import jax


def multi_host_environment() -> bool:
    """True on a multi-worker TPU slice/pod (GKE sets TPU_WORKER_HOSTNAMES) or a multi-task Slurm/MPI launch.

    On plain Cloud TPU VMs the worker list may only be in the metadata server: pass --distributed there.
    """
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        return True
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    return int(tasks) > 1


def initialize(flag: bool | None) -> bool:
    """`jax.distributed.initialize()` if `flag` is True, or if it is None and the environment is multi-host."""
    distributed = flag if flag is not None else multi_host_environment()
    if distributed:
        jax.distributed.initialize()
    return distributed
