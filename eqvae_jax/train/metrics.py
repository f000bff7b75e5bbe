"""Metric writing (TensorBoard + WORKDIR/metrics.jsonl) and host-side averaging of step metrics.

Step functions return small dicts of scalar device arrays (and possibly small arrays such as code counts, which
are summed over the interval instead of averaged); the loop keeps them on device and fetches them once per log
interval (one host sync per interval, not per step). Console lines are the loop's own
(train/console.py); the writers record scalars and images on process 0: TensorBoard event files, and one
JSON line per write in WORKDIR/metrics.jsonl (`{"update": N, "name": value, ...}`) for plots and scripts
(`train.metrics_file.read_metrics`); a gs:// workdir gets TensorBoard only (GCS objects cannot be appended to).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

from eqvae_jax.train.metrics_file import METRICS_FILE


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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard under WORKDIR/tensorboard (asynchronous) and WORKDIR/metrics.jsonl, on process 0 only."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    writers = [metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))]
    if "://" not in workdir:
        writers.append(JsonlWriter(os.path.join(workdir, METRICS_FILE)))
    return metric_writers.MultiWriter(writers)


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
