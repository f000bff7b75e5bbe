"""Multi-host start decision (eqvae_jax.parallel.distributed) under simulated cluster environments.

JAX's own detection code runs; what it reads is simulated: environment variables, JAX's flag that this is a
Cloud TPU VM, and the metadata server's answers (JAX's `get_metadata` is replaced: nothing is contacted).
`jax.distributed.initialize` is replaced by a recorder.
"""

import jax
import pytest
from jax._src.clusters import cloud_tpu_cluster

from eqvae_jax.parallel import distributed

CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture
def env(monkeypatch):
    """A clean environment (no cluster variables, not a TPU VM) and a recorder of initialize() calls."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # what `import jax` sets on a machine without TPU chips
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)

    def no_metadata(key):
        raise AssertionError(f"metadata server queried for {key!r}")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_metadata)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return monkeypatch, calls


def tpu_vm(monkeypatch, metadata: dict[str, str]) -> list[str]:
    """Simulate a Cloud TPU VM whose metadata server answers `metadata` (404 for other keys)."""
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    asked = []

    def get_metadata(key):
        asked.append(key)
        return (metadata[key], 200) if key in metadata else ("", 404)

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)
    return asked


def test_plain_machine_runs_single_process(env):
    _, calls = env
    assert distributed.detect() is None
    assert distributed.maybe_initialize() is False and calls == []


def test_single_host_tpu_vm_does_not_initialize(env):
    monkeypatch, calls = env
    asked = tpu_vm(monkeypatch, {"agent-worker-number": "0", "worker-network-endpoints": "10.130.0.5",
                                 "tpu-env": "ACCELERATOR_TYPE: 'v5p-8'\n"})
    assert distributed.detect() == distributed.Cluster("gcetpu", 1)
    assert "agent-worker-number" in asked and "worker-network-endpoints" in asked
    assert distributed.maybe_initialize() is False and calls == []


@pytest.mark.parametrize("endpoints", [
    "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8",  # current format: addresses
    "t1v-n-a-w-0:0:10.130.0.5,t1v-n-a-w-1:1:10.130.0.6,t1v-n-a-w-2:2:10.130.0.7,t1v-n-a-w-3:3:10.130.0.8",  # old
])
def test_v4_32_tpu_vm_slice_initializes_with_jax_detection(env, endpoints):
    monkeypatch, calls = env
    tpu_vm(monkeypatch, {"agent-worker-number": "2", "worker-network-endpoints": endpoints,
                         "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\n"})
    assert distributed.detect() == distributed.Cluster("gcetpu", 4)
    assert distributed.maybe_initialize() is True
    assert calls == [{}]  # no arguments: JAX detects coordinator (worker 0:8482), count and index itself
    assert cloud_tpu_cluster.GceTpuCluster.get_process_id() == 2


def test_multislice_counts_every_slice(env):
    monkeypatch, calls = env
    tpu_vm(monkeypatch, {"agent-worker-number": "0", "worker-network-endpoints": "10.0.0.1",
                         "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"})
    assert distributed.detect() == distributed.Cluster("gcetpu", 2)
    assert distributed.maybe_initialize() is True and calls == [{}]


@pytest.mark.parametrize("hosts, count", [("tpu-job-0", 1), ("tpu-job-0,tpu-job-1,tpu-job-2,tpu-job-3", 4)])
def test_gke_tpu_pods(env, hosts, count):
    monkeypatch, calls = env
    asked = tpu_vm(monkeypatch, {"tpu-env": "WORKER_ID: '0'\n"})  # GKE nodes have a metadata server too
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert distributed.detect() == distributed.Cluster("gketpu", count)
    assert asked == ["agent-worker-number", "tpu-env"]  # GCE checked first (no such key), then MEGASCALE_NUM_SLICES
    assert distributed.maybe_initialize() is (count > 1) and len(calls) == (count > 1)


@pytest.mark.parametrize("tasks", [1, 2])
def test_slurm(env, tasks):
    monkeypatch, calls = env
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": str(tasks),
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.detect() == distributed.Cluster("slurm", tasks)
    assert distributed.maybe_initialize() is (tasks > 1) and calls == ([{}] if tasks > 1 else [])


def test_open_mpi(env):
    monkeypatch, calls = env
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert distributed.detect() == distributed.Cluster("ompi", 2)
    assert distributed.maybe_initialize() is True and calls == [{}]


def test_explicit_launch_from_environment(env):
    monkeypatch, calls = env
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
    assert distributed.detect() is None  # the coordinator alone only overrides a detected cluster's
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID not"):
        distributed.detect()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.detect()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.detect() == distributed.Cluster("env", 2)
    assert distributed.maybe_initialize() is True
    assert calls == [{"coordinator_address": "localhost:12345", "num_processes": 2, "process_id": 1}]


def test_flags_force_or_prevent(env):
    monkeypatch, calls = env
    assert distributed.should_initialize(True) == (True, None)  # --distributed: JAX detects or explains
    assert distributed.maybe_initialize(True) is True and calls == [{}]
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    for name, value in {"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "8", "SLURM_PROCID": "3",
                        "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.should_initialize(False) == (False, None)  # --nodistributed: nothing is even detected
    assert distributed.maybe_initialize(False) is False and len(calls) == 1
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.maybe_initialize(None) is True and len(calls) == 1  # already initialised: idempotent
