"""Metric writers (TensorBoard event files + console via clu) and host-side averaging of step metrics.

Step functions return small dicts of scalar device arrays; the loop keeps them on device and only fetches them
every `log.every_steps` steps (one host sync per log interval, not per step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from clu import metric_writers


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard files under WORKDIR/tensorboard plus console logging; only process 0 writes files."""
    return metric_writers.create_default_writer(
        os.path.join(workdir, "tensorboard"), just_logging=jax.process_index() > 0, asynchronous=True
    )


class MetricBuffer:
    """Collects per-step metric dicts (device arrays) and summarises them at log time."""

    def __init__(self) -> None:
        self._steps: list[Mapping[str, jax.Array]] = []

    def add(self, metrics: Mapping[str, jax.Array]) -> None:
        self._steps.append(metrics)

    def __len__(self) -> int:
        return len(self._steps)

    def summary(self) -> dict[str, float]:
        """Mean of every metric over the buffered steps (keys missing from some steps averaged where present)."""
        fetched = jax.device_get(self._steps)
        self._steps = []
        keys = sorted({k for m in fetched for k in m})
        return {k: float(np.mean([np.asarray(m[k], np.float64) for m in fetched if k in m])) for k in keys}
