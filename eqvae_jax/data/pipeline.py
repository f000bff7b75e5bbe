"""Grain pipelines producing this process's batches as numpy dicts (global assembly lives in iterator.py).

Training: source -> [repeat per epoch] -> seeded global shuffle (new order each epoch) -> epochs ->
decode + crop (random_map over the global stream: the crop rng depends only on the seed and the element's
global position) -> this process's rows of every global batch (`GlobalBatchRows`) -> drop skipped images,
counting them per reason -> batch -> worker processes (mp_prefetch). The global batches, crops included, are
therefore the same whatever the number of processes and workers (as long as no image is skipped: a skipped
image shifts the rest of its worker's stream).
Bad images are removed before batching, so batches are always full; each element carries the skips that
preceded it (`skips`, one count per reason in decode.SKIP_REASONS), which the batch sums, so the counts
reach the main process exactly, even from worker processes, and are part of the checkpointed state.
(Skips after the last image of a finite stream have no element to ride on: they are logged, not counted.)

Eval: finite, unshuffled, padded with masked-out elements so every process yields the same number of full
batches; bad images are masked out (and counted) instead of dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grain
import numpy as np

from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.decode import SKIP_REASONS, SkipImage, decode_image, skip_code
from eqvae_jax.data.transforms import Crop

log = logging.getLogger(__name__)

_NO_SKIP = -1
_LOG_FIRST = 100  # log every skipped file up to this many per process, then every 1000th
_skips_logged = 0


class _Indexed:
    """Adds the source index to every record; indices >= len(source) are padding records (eval)."""

    def __init__(self, source: Any, length: int | None = None) -> None:
        self.source = source
        self.length = len(source) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= len(self.source):
            return {"index": index, "pad": True}
        record = dict(self.source[index])
        record["index"] = index
        record["pad"] = False
        return record


def _log_skip(name: str, error: SkipImage) -> None:
    global _skips_logged
    _skips_logged += 1
    if _skips_logged <= _LOG_FIRST or _skips_logged % 1000 == 0:
        log.warning("data: skipping %s (%s) [%d skipped in this process]", name, error, _skips_logged)


class DecodeCrop:
    """Record -> {'image' uint8 HWC, 'label', 'index', 'mask', 'skip'}; a bad record gets a skip code."""

    def __init__(self, crop: Crop, min_side: int) -> None:
        self.crop, self.min_side = crop, min_side

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = {"index": np.int64(record["index"]), "label": np.int32(record.get("label", -1))}
        if record["pad"]:
            return out | {"image": self._blank(), "mask": np.bool_(False), "skip": _NO_SKIP}
        try:
            if record["unreadable"]:
                raise SkipImage("unreadable", "could not read the file")
            image = decode_image(record["bytes"], self.min_side)
            array = self.crop(image, rng)
        except SkipImage as e:
            _log_skip(record["name"], e)
            return out | {"image": None, "mask": np.bool_(False), "skip": skip_code(e.reason)}
        return out | {"image": array, "mask": np.bool_(True), "skip": _NO_SKIP}

    def _blank(self) -> np.ndarray:
        return np.zeros((self.crop.size, self.crop.size, 3), np.uint8)


class _SkipCountingIterator(grain.DatasetIterator):
    """Drops (train) or masks (eval) skipped elements and attaches per-reason counts to the next output."""

    def __init__(
        self, parent: grain.DatasetIterator, keep_skipped: bool, max_consecutive: int, size: int
    ) -> None:
        super().__init__(parent)
        self._keep, self._max, self._size = keep_skipped, max_consecutive, size
        self._pending = np.zeros(len(SKIP_REASONS), np.int64)

    def __next__(self) -> dict[str, Any]:
        consecutive = 0
        while True:
            element = next(self._parent)
            code = element.pop("skip")
            if code != _NO_SKIP:
                self._pending[code] += 1
                if self._keep:
                    element["image"] = np.zeros((self._size, self._size, 3), np.uint8)
                else:
                    consecutive += 1
                    if consecutive >= self._max:
                        counts = dict(zip(SKIP_REASONS, self._pending.tolist(), strict=True))
                        raise RuntimeError(
                            f"data: {consecutive} consecutive images could not be used: {counts}"
                        )
                    continue
            element["skips"] = self._pending.copy()
            self._pending[:] = 0
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": self._pending.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = np.asarray(state["pending"], np.int64)


class SkipCounting(grain.IterDataset):
    """IterDataset wrapper for _SkipCountingIterator."""

    def __init__(
        self, parent: grain.IterDataset, keep_skipped: bool, max_consecutive: int, size: int
    ) -> None:
        super().__init__(parent)
        self._keep, self._max, self._size = keep_skipped, max_consecutive, size

    def __iter__(self) -> _SkipCountingIterator:
        return _SkipCountingIterator(self._parent.__iter__(), self._keep, self._max, self._size)


def _to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """uint8 [0, 255] -> float32 [-1, 1] in the workers (output_dtype='float32')."""
    return batch | {"image": (batch["image"].astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)}


class GlobalBatchRows(grain.MapDataset):
    """This process's share of a global stream cut into global batches of `global_batch` elements.

    `rows` are the rows of each global batch held by this process's devices, in ascending order (what
    `jax.make_array_from_process_local_data` expects of the local batch), so that concatenating the processes'
    batches gives the global stream's batches in order. With `workers` > 1 Grain gives worker w the elements
    w::workers of this dataset and returns the batches round-robin; the element order here anticipates that,
    so that the process's batch m is still global batch m. The end of a finite stream that does not fill a
    whole round of `workers` global batches follows in stream order (this process's rows of it); batching
    (drop_remainder) decides what becomes of it.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        rows: np.ndarray,
        global_batch: int,
        workers: int = 0,
    ) -> None:
        super().__init__(parent)
        self._rows = np.asarray(rows, np.int64)
        if self._rows.ndim != 1 or not len(self._rows) or np.any(np.diff(self._rows) <= 0) \
                or self._rows[0] < 0 or self._rows[-1] >= global_batch:
            raise ValueError(f"rows must be ascending indices into a global batch of {global_batch}: {rows}")
        self._global, self._workers = global_batch, max(1, workers)
        rounds = len(parent) // (global_batch * self._workers)
        self._aligned = rounds * self._workers * len(self._rows)
        self._tail: list[int] = []  # at most workers global batches
        for m in range(rounds * self._workers, -(-len(parent) // global_batch)):
            self._tail += [m * global_batch + int(r) for r in self._rows if m * global_batch + r < len(parent)]

    def __len__(self) -> int:
        return self._aligned + len(self._tail)

    def global_index(self, index: int) -> int:
        """Position in the parent (global) stream of this dataset's element `index`."""
        if index >= self._aligned:
            return self._tail[index - self._aligned]
        per = len(self._rows)
        worker, t = index % self._workers, index // self._workers
        k, j = divmod(t, per)
        return (k * self._workers + worker) * self._global + int(self._rows[j])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]

    def __str__(self) -> str:
        return f"GlobalBatchRows(rows={self._rows.tolist()}, global_batch={self._global}, workers={self._workers})"


def contiguous_rows(per_process_batch: int, process_index: int) -> np.ndarray:
    """Process i's rows when every process's devices hold one contiguous block of the global batch."""
    return np.arange(process_index * per_process_batch, (process_index + 1) * per_process_batch)


def _drop_train_fields(batch: dict[str, Any]) -> dict[str, Any]:
    batch.pop("mask")
    return batch


def _crop(config: DataConfig, train: bool) -> Crop:
    return Crop(
        config.transform if train else config.eval_transform,
        config.image_size,
        flip=bool(config.flip) and train,
        min_fraction=config.crop_min_fraction,
        max_fraction=config.crop_max_fraction,
    )


def _decode(ds: grain.MapDataset, config: DataConfig, train: bool) -> grain.MapDataset:
    return ds.random_map(DecodeCrop(_crop(config, train), config.min_side), seed=config.seed + 1)


def _finish(
    ds: grain.MapDataset, config: DataConfig, train: bool, per_process_batch: int
) -> grain.IterDataset:
    """Shared tail: skip handling, batch, dtype, worker processes (`ds` is decoded already)."""
    read = grain.ReadOptions(
        num_threads=max(1, config.read_threads), prefetch_buffer_size=config.read_buffer_size
    )
    it = ds.to_iter_dataset(read)
    it = SkipCounting(
        it, keep_skipped=not train, max_consecutive=config.max_consecutive_skips, size=config.image_size
    )
    it = it.batch(per_process_batch, drop_remainder=config.drop_remainder if train else False)
    if train:
        it = it.map(_drop_train_fields)
    if config.output_dtype == "float32":
        it = it.map(_to_float)
    elif config.output_dtype != "uint8":
        raise ValueError(f"data.output_dtype must be 'uint8' or 'float32', got {config.output_dtype!r}")
    options = grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
    )
    return it.mp_prefetch(options)


def train_dataset(
    config: DataConfig,
    source: Any,
    per_process_batch: int,
    process_index: int,
    process_count: int,
    rows: np.ndarray | None = None,
) -> grain.IterDataset:
    """This process's training batches: {'image' (B,S,S,3), 'label' (B,), 'index' (B,), 'skips' (B,R)}.

    `rows`: the rows of each global batch (of per_process_batch * process_count) this process loads, default
    the contiguous block `process_index`; the iterator passes the rows its devices hold.
    """
    ds = grain.MapDataset.source(_Indexed(source))
    if config.repeats_per_epoch > 1:
        ds = ds.repeat(config.repeats_per_epoch)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = _decode(ds.repeat(config.num_epochs), config, True)
    rows = contiguous_rows(per_process_batch, process_index) if rows is None else rows
    ds = GlobalBatchRows(ds, rows, per_process_batch * process_count, config.worker_count)
    return _finish(ds, config, True, per_process_batch)


def eval_num_batches(num_records: int, per_process_batch: int, process_count: int, worker_count: int) -> int:
    """Batches each process yields for one eval pass.

    Every process yields the same number of full batches; each worker batches its own slice, so the
    per-process stream is padded to a multiple of per_process_batch * workers.
    """
    per_round = per_process_batch * process_count * max(1, worker_count)
    return max(1, math.ceil(num_records / per_round)) * max(1, worker_count)


def eval_dataset(
    config: DataConfig,
    source: Any,
    per_process_batch: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    """This process's eval batches plus 'mask' (False for padding and bad images); deterministic order."""
    batches = eval_num_batches(len(source), per_process_batch, process_count, config.worker_count)
    ds = grain.MapDataset.source(_Indexed(source, batches * per_process_batch * process_count))
    ds = ds[process_index::process_count]
    return _finish(_decode(ds, config, False), config, False, per_process_batch)
