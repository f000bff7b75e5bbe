"""WORKDIR/metrics.jsonl: one JSON line per scalar write of a run (process 0, local workdirs), for plots and
scripts. Written by `train.metrics.JsonlWriter`; read here without importing the writers' TensorFlow."""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows written so far, `{"update": N, "name": value, ...}` (an empty list before the first one)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
