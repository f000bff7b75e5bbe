"""Metric writing (TensorBoard + WORKDIR/metrics.jsonl) and host-side averaging of step metrics.

Step functions return small dicts of scalar device arrays (and possibly small arrays such as code counts, which
are summed over the interval instead of averaged); the loop keeps them on device and fetches them once per log
interval (one host sync per interval, not per step). Console lines are the loop's own
(train/console.py); the writers record scalars and images on process 0: TensorBoard event files (written without
TensorFlow, `train.event_file`, in a background thread), and one JSON line per write in WORKDIR/metrics.jsonl
(`{"update": N, "name": value, ...}`) for plots and scripts (`train.metrics_file.read_metrics`). An object store
cannot append to an object: for a gs:// workdir both files are written to a local staging directory and copied up
(`StagedWriter`) at most every `SYNC_SECONDS`, at every flush and at close; a resumed run first copies
metrics.jsonl down and appends to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
from clu import asynclib

from eqvae_jax import storage
from eqvae_jax.train.event_file import EventFileWriter
from eqvae_jax.train.metrics_file import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"
SYNC_SECONDS = 60.0  # a gs:// workdir's TensorBoard and metrics.jsonl lag the run by at most this much
ROTATE_SECONDS = 600.0  # a gs:// workdir's TensorBoard starts a new event file at the first sync after this


class MetricWriter(Protocol):
    """What the jobs write through: scalars and images per update (the interface of clu's metric writers)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MultiWriter:
    """Every write goes to each of the writers, in order."""

    def __init__(self, writers: list[MetricWriter]):
        self._writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for w in self._writers:
            w.write_images(step, images)

    def flush(self) -> None:
        for w in self._writers:
            w.flush()

    def close(self) -> None:
        for w in self._writers:
            w.close()


class AsyncWriter:
    """A writer's writes in one background thread, in order (PNG encoding stays off the training loop); an error
    there is raised at the next write or at flush."""

    def __init__(self, writer: MetricWriter):
        self._writer = writer
        self._pool = asynclib.Pool(thread_name_prefix="metric_writer", max_workers=1)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._pool(self._writer.write_scalars)(step, dict(scalars))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self._pool(self._writer.write_images)(step, dict(images))

    def flush(self) -> None:
        try:
            self._pool.join()
        finally:
            self._writer.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.close()


class JsonlWriter:
    """Scalars as JSON lines appended to a local file (everything else is TensorBoard's)."""

    def __init__(self, path: str):
        self.path = path

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"update": int(step)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StagedWriter(MultiWriter):
    """The writers of a gs:// workdir, writing into a local `storage.StagedDir` that is copied up every
    `SYNC_SECONDS` (checked after each write), at every flush and at close. Every `ROTATE_SECONDS` a sync
    closes the writers first and opens new ones, so TensorBoard starts a new event file: an event file (images
    included) is uploaded again only while it is the current one, then once complete, and removed locally
    (object stores cannot append, and re-uploading one file for a whole run would grow without bound)."""

    def __init__(self, staged: storage.StagedDir):
        self.staged = staged
        self.rotated = time.monotonic()
        super().__init__(_writers(staged.local))

    def _maybe_sync(self) -> None:
        if time.monotonic() - self.staged.last_sync >= SYNC_SECONDS:
            self.flush()

    def write_scalars(self, step, scalars) -> None:
        super().write_scalars(step, scalars)
        self._maybe_sync()

    def write_images(self, step, images) -> None:
        super().write_images(step, images)
        self._maybe_sync()

    def flush(self) -> None:
        if time.monotonic() - self.rotated < ROTATE_SECONDS:
            super().flush()
            self.staged.sync()
            return
        super().close()
        self.staged.sync()
        shutil.rmtree(os.path.join(self.staged.local, TENSORBOARD_DIR), ignore_errors=True)  # uploaded, complete
        self._writers = tuple(_writers(self.staged.local))
        self.rotated = time.monotonic()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.staged.close()


def _writers(root: str) -> list[MetricWriter]:
    return [AsyncWriter(EventFileWriter(os.path.join(root, TENSORBOARD_DIR))),
            JsonlWriter(os.path.join(root, METRICS_FILE))]


def create_writer(workdir: str) -> MetricWriter:
    """TensorBoard under WORKDIR/tensorboard (asynchronous) and WORKDIR/metrics.jsonl, on process 0 only."""
    if jax.process_index() > 0:
        return MultiWriter([])
    if storage.is_url(workdir):
        return StagedWriter(storage.StagedDir(workdir, pull=(METRICS_FILE,)))
    return MultiWriter(_writers(workdir))


class MetricBuffer:
    """Collects per-step metric dicts (device arrays) until the next fetch."""

    def __init__(self) -> None:
        self._steps: list[Mapping[str, jax.Array]] = []

    def add(self, metrics: Mapping[str, jax.Array]) -> None:
        self._steps.append(metrics)

    def __len__(self) -> int:
        return len(self._steps)

    def fetch(self) -> list[dict[str, np.ndarray]]:
        """The buffered steps' metrics on the host (one transfer), emptying the buffer."""
        fetched = jax.device_get(self._steps)
        self._steps = []
        return fetched


def mean_of(steps: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Mean of every scalar metric over the steps (keys missing from some steps averaged where present); array
    metrics are left to `sum_of`."""
    keys = sorted({k for m in steps for k, v in m.items() if np.ndim(v) == 0})
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in steps if k in m])) for k in keys}


def sum_of(steps: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum over the steps of every array metric (ndim >= 1, e.g. a VQGAN's code counts)."""
    keys = sorted({k for m in steps for k, v in m.items() if np.ndim(v) > 0})
    return {k: np.sum([np.asarray(m[k]) for m in steps if k in m], axis=0) for k in keys}
