"""Host-local batches -> global jax.Arrays sharded over the mesh's batch axes."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from eqvae_jax.parallel.mesh import batch_divisor, batch_sharding


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """Per-process batch size for `global_batch`, or a clear error if it cannot be split evenly."""
    shards = batch_divisor(mesh)
    if global_batch % shards:
        raise ValueError(f"global batch {global_batch} is not divisible by the {shards} batch shards of the mesh")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each host's slice of the batch into one global array per key."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
