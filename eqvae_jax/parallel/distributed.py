"""Multi-host start: decide whether this process joins a multi-process JAX job, and join it.

`maybe_initialize(force)` is called once, first thing, by every entry point (`eqvae_jax.main`,
`eqvae_jax.sample`). With `force=None` the decision is JAX's own cluster detection (`jax._src.clusters`, the
environments `jax.distributed.initialize()` recognises without arguments, checked in JAX's order):

  ompi      Open MPI (`OMPI_MCA_orte_hnp_uri`; size `OMPI_COMM_WORLD_SIZE`)
  slurm     Slurm (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`)
  gcetpu    a plain Cloud TPU VM slice: the metadata server's `agent-worker-number` exists, the workers are the
            entries of `worker-network-endpoints` (x `MEGASCALE_NUM_SLICES` for multislice); coordinator =
            worker 0, port 8482
  gketpu    TPU on GKE (a TPU VM with `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES`: one entry per worker)
  k8s       Kubernetes with the `kubernetes` package (jax[k8s])

and the job initialises when the detected environment has more than one process: a single-host TPU VM
(v5p-8, v6e-8: one worker) runs without the distributed service. Besides, an explicit launch (any machine,
e.g. several processes on one host) is recognised from `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
`JAX_PROCESS_ID` (JAX itself reads only the first of these). `force=True` (`--distributed`) initialises
even when nothing is detected (JAX then detects or fails with its own message); `force=False`
(`--nodistributed`) never does.

TPU detection only runs on a Cloud TPU VM (JAX sets `running_in_cloud_tpu_vm` at import when it finds TPU
chips and libtpu); elsewhere JAX sets `TPU_SKIP_MDS_QUERY` and the metadata server is never contacted.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
from jax._src import clusters  # the environments jax.distributed.initialize() detects without arguments

log = logging.getLogger(__name__)
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What was detected: the environment's name (JAX's `ClusterEnv.name`, or 'env') and its process count."""

    name: str
    num_processes: int


def _explicit() -> Cluster | None:
    """An explicit launch from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, if all are set."""
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if os.environ.get(n)]
    if not (os.environ.get(ENV_NUM_PROCESSES) or os.environ.get(ENV_PROCESS_ID)):
        return None  # JAX_COORDINATOR_ADDRESS alone only overrides the coordinator of a detected cluster
    if len(present) < len(names):
        missing = [n for n in names if n not in present]
        raise ValueError(f"explicit multi-process launch: {', '.join(present)} set but {', '.join(missing)} not")
    try:
        count, index = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    except ValueError:
        raise ValueError(f"{ENV_NUM_PROCESSES}={os.environ[ENV_NUM_PROCESSES]!r} and "
                         f"{ENV_PROCESS_ID}={os.environ[ENV_PROCESS_ID]!r} must be integers") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{ENV_PROCESS_ID}={index} must be in [0, {ENV_NUM_PROCESSES}={count})")
    return Cluster("env", count)


def detect() -> Cluster | None:
    """The multi-process environment this process runs in, or None (a plain single-process run).

    The explicit JAX_* launch first, then JAX's cluster environments in JAX's own order (opt-in ones like
    mpi4py are skipped, as `jax.distributed.initialize()` skips them).
    """
    explicit = _explicit()
    if explicit is not None:
        return explicit
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return Cluster(env.name, int(env.get_process_count()))
    return None


def initialize_args() -> dict[str, object]:
    """Arguments for `jax.distributed.initialize`: from the explicit JAX_* launch, else none (JAX detects)."""
    if _explicit() is None:
        return {}
    return {"coordinator_address": os.environ[ENV_COORDINATOR],
            "num_processes": int(os.environ[ENV_NUM_PROCESSES]),
            "process_id": int(os.environ[ENV_PROCESS_ID])}


def should_initialize(force: bool | None) -> tuple[bool, Cluster | None]:
    """(initialise?, what was detected). `force` True/False overrides the detection; None follows it."""
    if force is False:
        return False, None
    cluster = detect()
    if force:
        return True, cluster
    return cluster is not None and cluster.num_processes > 1, cluster


def maybe_initialize(force: bool | None = None) -> bool:
    """Call `jax.distributed.initialize()` when this is a multi-process job (see the module doc); True if it did.

    Must run before anything touches a JAX backend (jax.devices(), any computation). Idempotent.
    """
    if jax.distributed.is_initialized():
        return True
    init, cluster = should_initialize(force)
    if not init:
        if cluster is not None:
            log.info("jax.distributed: %s environment with %d process: not initialising",
                         cluster.name, cluster.num_processes)
        return False
    jax.distributed.initialize(**initialize_args())
    log.info("jax.distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
                 jax.process_count(), cluster.name if cluster else "forced", jax.local_device_count(),
                 jax.device_count())
    return True
