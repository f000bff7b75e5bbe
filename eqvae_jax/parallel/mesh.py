"""The device mesh ('data', 'fsdp'), batch shardings, and rule-based parameter shardings.

One mesh for every job (architecture.md §3). The global batch is always sharded over both axes; parameters
are replicated unless a rule shards them over 'fsdp'. Axis types are explicitly Auto (jax.make_mesh's default
became Explicit).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(num_devices: int, data: int, fsdp: int) -> tuple[int, int]:
    """Resolve a (data, fsdp) request against the device count; -1 means 'all the rest'."""
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


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data','fsdp') mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(len(devices), data, fsdp)
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


def param_shardings(
    tree,
    mesh: Mesh,
    rules: Sequence[tuple[str, PartitionSpec]] = (),
    fsdp_min_size: int = 2**18,
    scanned: Sequence[str] = (),
):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs).

    `rules` are (regex over the '/'-joined key path, PartitionSpec) pairs, first match wins. Leaves that no rule
    matches are FSDP-sharded over their largest divisible dimension when the mesh has fsdp > 1 and the leaf has
    at least `fsdp_min_size` elements; everything else is replicated. Leaves whose path matches a regex in
    `scanned` carry a leading layer axis consumed by `jax.lax.scan` (stacked blocks): that axis is never
    sharded (each scan step would gather every layer otherwise), the FSDP choice is made among the others.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    stacked = [re.compile(pattern) for pattern in scanned]
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        name = "/".join(_key_str(k) for k in path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, spec)
        shape = tuple(np.shape(leaf))
        if any(pattern.search(name) for pattern in stacked):
            if len(shape) < 2 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
                return NamedSharding(mesh, PartitionSpec())
            return NamedSharding(mesh, PartitionSpec(None, *fsdp_spec(shape[1:], fsdp_size, 0)))
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
