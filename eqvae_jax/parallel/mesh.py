"""The device mesh ('data', 'fsdp'), batch shardings, and rule-based parameter shardings.

One mesh for every job, with the same meaning everywhere: the global batch is split over both axes;
parameters are replicated unless a rule shards them over 'fsdp'. `mesh.data` / `mesh.fsdp` in a job config:
a positive size, -1 for "all remaining devices", or (data only) 0 for "one group per TPU slice" (data
parallel across slices, FSDP inside). Axis types are explicitly Auto (jax.make_mesh's default became Explicit).

Parameter sharding is a rule table: (regex over the '/'-joined path, PartitionSpec or FSDP(skip)) pairs, first
match wins; `FSDP(skip=1)` is the rule for scanned layers (stacked along a leading depth axis that each scan
iteration slices, so that axis must never be sharded). Optimizer states and EMA copies hold the same paths
below their own prefix, so one table shards a whole train state consistently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(num_devices: int, data: int, fsdp: int, slices: int = 1) -> tuple[int, int]:
    """Resolve a (data, fsdp) request against the device count; -1 means 'all the rest', data 0 the slices."""
    if data == 0:
        data = slices
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if fsdp == -1:
        fsdp = num_devices // max(data, 1)
    if data == -1:
        data = num_devices // max(fsdp, 1)
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"mesh: data={data} x fsdp={fsdp} does not cover the {num_devices} available devices exactly"
        )
    return data, fsdp


def slice_count(devices: Sequence[jax.Device] | None = None) -> int:
    """Number of TPU slices among `devices` (1 without multi-slice, and on CPU/GPU)."""
    return len({getattr(d, "slice_index", 0) for d in (devices if devices is not None else jax.devices())})


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp') mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(len(devices), data, fsdp, slice_count(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """How many shards the global batch is split into."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by the fsdp axis; small tensors stay replicated."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


@dataclasses.dataclass(frozen=True)
class FSDP:
    """Rule: shard the largest dimension divisible by the fsdp axis, never one of the first `skip` axes."""

    skip: int = 0


SCANNED_LAYERS = ((r"(^|/)blocks/", FSDP(skip=1)),)  # models whose `blocks` are stacked for lax.scan


def param_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, PartitionSpec | FSDP]] = (),
    fsdp_min_size: int = 2**18,
) -> Any:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs), from a rule table (see module docstring).

    Leaves that no rule matches follow FSDP(skip=0). FSDP rules leave tensors with fewer than `fsdp_min_size`
    elements (norms, biases, counters) replicated, and everything is replicated when the mesh has fsdp == 1.
    """
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        name = "/".join(_key_str(k) for k in path)
        rule = next((r for pattern, r in compiled if pattern.search(name)), FSDP())
        if isinstance(rule, PartitionSpec):
            return NamedSharding(mesh, rule)
        shape = tuple(np.shape(leaf))
        if int(np.prod(shape, dtype=np.int64)) < fsdp_min_size or len(shape) <= rule.skip:
            return NamedSharding(mesh, PartitionSpec())
        spec = fsdp_spec(shape[rule.skip:], fsdp_size, 0)
        return NamedSharding(mesh, PartitionSpec(*([None] * rule.skip), *spec) if len(spec) else PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree)


def local_rows(sharding: NamedSharding, global_batch_size: int) -> np.ndarray:
    """Rows of a global batch held by this process's devices, ascending (the local batch's order for
    `jax.make_array_from_process_local_data`)."""
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = sorted({r for sl in index_map.values() for r in range(*sl[0].indices(global_batch_size))})
    return np.asarray(rows, np.int64)


def place(tree: Any, shardings: Any) -> Any:
    """Put a host/device pytree onto the given shardings."""
    return jax.tree.map(jax.device_put, tree, shardings)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
