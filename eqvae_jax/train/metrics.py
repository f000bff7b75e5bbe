"""TensorBoard metric writing and host-side averaging of step metrics.

Step functions return small dicts of scalar device arrays; the loop keeps them on device and fetches them
once per log interval (one host sync per interval, not per step). Console lines are the loop's own
(train/console.py); the writer only writes TensorBoard event files (process 0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from clu import metric_writers


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """Asynchronous TensorBoard writer under WORKDIR/tensorboard on process 0; a no-op writer elsewhere."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))


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
    """Mean of every metric over the steps (keys missing from some steps averaged where present)."""
    keys = sorted({k for m in steps for k in m})
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in steps if k in m])) for k in keys}
