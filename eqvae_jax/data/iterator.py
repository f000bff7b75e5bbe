"""Global, sharded batches for the mesh, with a checkpointable state and skip counters.

`InputIterator` wraps a Grain pipeline of this process's batches, turns each into global jax.Arrays sharded
over the mesh's batch axes ('data', 'fsdp') with `jax.make_array_from_process_local_data`, scales uint8
images to [-1, 1] on the devices, and keeps `prefetch` batches in flight.

Checkpointing: `get_state()` / `set_state()` use bytes (JSON) like Grain's DataLoaderIterator, so
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` work as items of an Orbax composite
checkpoint. The state is the one before the next batch the caller will receive (prefetched batches are
re-read after a restore), so a restored iterator yields bit-identical next batches.
"""

from __future__ import annotations

import collections
import json
import logging
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from eqvae_jax.data import pipeline
from eqvae_jax.data.config import DataConfig, as_data_config
from eqvae_jax.data.decode import SKIP_REASONS
from eqvae_jax.data.sources import open_source
from eqvae_jax.parallel.mesh import batch_sharding as mesh_batch_sharding
from eqvae_jax.parallel.mesh import local_rows

_DEVICE_KEYS = ("image", "label", "mask")
log = logging.getLogger(__name__)


def batch_sharding(mesh_or_sharding: Mesh | NamedSharding) -> NamedSharding:
    """The sharding of a global batch: a given NamedSharding, or the mesh's batch sharding."""
    if isinstance(mesh_or_sharding, NamedSharding):
        return mesh_or_sharding
    return mesh_batch_sharding(mesh_or_sharding)


def _scale(images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) - 127.5) * (1.0 / 127.5)  # exact at 0 and 255


class InputIterator:
    """Iterator of global batches, by default {'image': float32 [-1, 1] (B, S, S, 3), 'label': int32 (B,)
    [, 'mask': bool (B,)]}; `device_keys` selects other host fields (the latent cache's mean/std/label)."""

    def __init__(
        self,
        dataset: grain.IterDataset,
        sharding: NamedSharding,
        global_batch_size: int,
        prefetch: int = 2,
        scale_on_device: bool = True,
        num_batches: int | None = None,
        device_keys: tuple[str, ...] = _DEVICE_KEYS,
    ) -> None:
        self._dataset, self._sharding, self._device_keys = dataset, sharding, device_keys
        self.global_batch_size, self.num_batches = global_batch_size, num_batches
        self._prefetch = max(1, prefetch)
        self._scale = jax.jit(_scale, out_shardings=sharding) if scale_on_device else None
        self._it: grain.DatasetIterator | None = None
        self._queue: collections.deque = collections.deque()  # (state before the batch, skips, batch)
        self._skips = np.zeros(len(SKIP_REASONS), np.int64)
        self._exhausted = False

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> InputIterator:
        return self

    def _grain(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = iter(self._dataset)
        return self._it

    def _to_global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for key in self._device_keys:
            if key in host:
                value = host[key]
                shape = (self.global_batch_size,) + value.shape[1:]
                out[key] = jax.make_array_from_process_local_data(self._sharding, value, shape)
        if self._scale is not None and "image" in out and out["image"].dtype == jnp.uint8:
            out["image"] = self._scale(out["image"])
        return out

    def _fill(self) -> None:
        it = self._grain()
        while not self._exhausted and len(self._queue) < self._prefetch:
            state = it.get_state()
            try:
                host = next(it)
            except StopIteration:
                self._exhausted = True
                break
            skips = np.asarray(host.pop("skips")).sum(axis=0) if "skips" in host else np.zeros_like(self._skips)
            self._queue.append((state, skips, self._to_global(host)))

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()
        if not self._queue:
            self.close()  # a finite (eval) pass is over: stop its worker processes
            raise StopIteration
        _, skips, batch = self._queue.popleft()
        if skips.any():
            self._skips += skips
            new = {r: int(n) for r, n in zip(SKIP_REASONS, skips, strict=True) if n}
            log.warning("data: batch had skipped images %s; total %s", new, self.skip_counts)
        self._fill()
        return batch

    # -- counters --------------------------------------------------------------------------------------
    @property
    def skip_counts(self) -> dict[str, int]:
        """Images skipped so far in this process, per reason (for the training loop's logs)."""
        return {r: int(n) for r, n in zip(SKIP_REASONS, self._skips, strict=True)}

    # -- checkpointing (Grain DataLoaderIterator protocol: bytes) ----------------------------------------
    def get_state(self) -> bytes:
        """State before the next batch to be returned (JSON bytes)."""
        state = self._queue[0][0] if self._queue else self._grain().get_state()
        return json.dumps({"grain": state, "skips": self._skips.tolist()}).encode()

    def set_state(self, state: bytes) -> None:
        """Restore; the next batch is the one that followed the saved state."""
        decoded = json.loads(state)
        self._queue.clear()
        self._exhausted = False
        self._grain().set_state(decoded["grain"])
        self._skips = np.asarray(decoded.get("skips", np.zeros_like(self._skips)), np.int64)

    def start_prefetch(self) -> None:
        """Called by grain.checkpoint.CheckpointHandler after a restore: start reading ahead."""
        self._fill()

    def close(self) -> None:
        """Stop worker processes."""
        self._queue.clear()
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def _per_process_batch(global_batch_size: int, sharding: NamedSharding) -> int:
    """Rows of the global batch this process loads; checks that the batch splits evenly."""
    count = jax.process_count()
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if global_batch_size % count or global_batch_size % shards:
        raise ValueError(
            f"global batch {global_batch_size} must divide by the process count {count} "
            f"and by the number of batch shards {shards}"
        )
    return global_batch_size // count


def build_train_iterator(config: DataConfig, mesh_or_sharding: Mesh | NamedSharding,
                         global_batch_size: int) -> InputIterator:
    """The training iterator for a data section: infinite unless config.num_epochs is set."""
    config = as_data_config(config)
    sharding = batch_sharding(mesh_or_sharding)
    per_process = _per_process_batch(global_batch_size, sharding)
    source = open_source(config, train=True)
    log.info("data: training on %r, %d per process", source, per_process)
    dataset = pipeline.train_dataset(config, source, per_process, jax.process_index(), jax.process_count(),
                                     local_rows(sharding, global_batch_size))
    return InputIterator(
        dataset, sharding, global_batch_size, config.prefetch, config.output_dtype == "uint8"
    )


def build_eval_iterator(config: DataConfig, mesh_or_sharding: Mesh | NamedSharding,
                        global_batch_size: int) -> InputIterator:
    """One deterministic pass over the held-out images; batches carry 'mask' (False = padding/bad image)."""
    config = as_data_config(config)
    sharding = batch_sharding(mesh_or_sharding)
    per_process = _per_process_batch(global_batch_size, sharding)
    source = open_source(config, train=False)
    count = jax.process_count()
    dataset = pipeline.eval_dataset(config, source, per_process, jax.process_index(), count)
    num_batches = pipeline.eval_num_batches(len(source), per_process, count, config.worker_count)
    return InputIterator(
        dataset, sharding, global_batch_size, config.prefetch, config.output_dtype == "uint8", num_batches
    )
