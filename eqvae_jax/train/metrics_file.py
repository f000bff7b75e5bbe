"""WORKDIR/metrics.jsonl: one JSON line per scalar write of a run (process 0, local workdirs), for plots and
scripts. Written by `train.metrics.JsonlWriter` (for a gs:// workdir through a local copy, `train.metrics`); read
here without importing the writers."""

from __future__ import annotations

import json
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows written so far, `{"update": N, "name": value, ...}` (an empty list before the first one)."""
    from etils import epath

    path = epath.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
