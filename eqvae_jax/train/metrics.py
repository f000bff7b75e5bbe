"""Metric writing (TensorBoard + WORKDIR/metrics.jsonl) and host-side averaging of step metrics.

Step functions return small dicts of scalar device arrays (and possibly small arrays such as code counts, which
are summed over the interval instead of averaged); the loop keeps them on device and fetches them once per log
interval (one host sync per interval, not per step). Console lines are the loop's own
(train/console.py); the writers record scalars and images on process 0: TensorBoard event files, and one
JSON line per write in WORKDIR/metrics.jsonl (`{"update": N, "name": value, ...}`) for plots and scripts
(`train.metrics_file.read_metrics`). An object store cannot append to an object, and TensorFlow's event writer
cannot be pointed at any GCS endpoint but Google's (eqvae_jax/storage.py): for a gs:// workdir both files are
written to a local staging directory and copied up (`StagedWriter`) at most every `SYNC_SECONDS`, at every flush
and at close; a resumed run first copies metrics.jsonl down and appends to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

from eqvae_jax import storage
from eqvae_jax.train.metrics_file import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"
SYNC_SECONDS = 60.0  # a gs:// workdir's TensorBoard and metrics.jsonl lag the run by at most this much
ROTATE_SECONDS = 600.0  # a gs:// workdir's TensorBoard starts a new event file at the first sync after this


class JsonlWriter(metric_writers.MetricWriter):
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

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StagedWriter(metric_writers.MultiWriter):
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


def _writers(root: str) -> list[metric_writers.MetricWriter]:
    return [metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(root, TENSORBOARD_DIR))),
            JsonlWriter(os.path.join(root, METRICS_FILE))]


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard under WORKDIR/tensorboard (asynchronous) and WORKDIR/metrics.jsonl, on process 0 only."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    if storage.is_url(workdir):
        return StagedWriter(storage.StagedDir(workdir, pull=(METRICS_FILE,)))
    return metric_writers.MultiWriter(_writers(workdir))


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
