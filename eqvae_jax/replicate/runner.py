"""Running a list of stages: each in its own directory, skipped when its completion marker exists, timed, with an
overall ETA on the console.

A stage is done when `DIR/<stage>/DONE.json` exists (written after the stage's job returned, with its wall time
and results) and, for a stage that summarises others (the report: `Stage.inputs`), when its marker records exactly
the stages it reads now, each with the wall time of its marker then: a run that gains stages (the VQ family added
to a finished KL run) or redoes one writes its report again. A stage interrupted midway has no marker: the next
run calls it again and its job resumes from its own checkpoints (EQ-VAE / DiT / MaskGIT checkpoints, eval_vae
shards, extraction chunks, per-checkpoint sample scores). `DIR/stages.json` records
every stage's wall time (the report reads it). The ETA adds up the estimates of the stages still to run: a
stage's work units times its kind's seconds per unit, measured on this run's finished stages of that kind when
there are any, else the default rate (measured on 2 CPU cores, docs/replication.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MARKER = "DONE.json"
RECORD = "stages.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # its directory under the run's root
    kind: str  # stages of a kind share a cost rate (seconds per unit)
    units: float  # work: updates, images, samples (what the kind's rate is per)
    run: Callable[[], Mapping[str, Any]]  # does the work; returns the results stored in the marker
    inputs: tuple[str, ...] = ()  # the stages whose results it reads, when it must be redone as they change


def marker_path(root: str, name: str) -> str:
    return os.path.join(root, name, MARKER)


def read_marker(root: str, name: str) -> dict[str, Any] | None:
    path = marker_path(root, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def inputs_stamp(root: str, stage: Stage) -> dict[str, float | None]:
    """{input stage: the wall time in its marker (None without one)}: what a summarising stage covered."""
    stamp = {}
    for name in stage.inputs:
        marker = read_marker(root, name)
        stamp[name] = None if marker is None else marker.get("seconds")
    return stamp


def is_done(root: str, stage: Stage) -> bool:
    """Its marker exists and, for a stage with `inputs`, it covered exactly those stages' current markers."""
    marker = read_marker(root, stage.name)
    if marker is None:
        return False
    return not stage.inputs or marker.get("inputs") == inputs_stamp(root, stage)


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)  # the stage record in run order
    os.replace(tmp, path)


def read_record(root: str) -> dict[str, Any]:
    path = os.path.join(root, RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def rates(record: Mapping[str, Any], defaults: Mapping[str, float]) -> dict[str, float]:
    """Seconds per unit of each kind: this run's measurements where it has some, else the defaults."""
    out = dict(defaults)
    measured: dict[str, list[float]] = {}
    for entry in record.values():
        if entry.get("units"):
            measured.setdefault(entry["kind"], []).append(entry["seconds"] / entry["units"])
    out.update({k: sum(v) / len(v) for k, v in measured.items()})
    return out


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_stages(stages: Sequence[Stage], root: str, default_rates: Mapping[str, float],
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the unfinished stages in order; returns the stage record {name: {kind, units, seconds}}."""
    record = read_record(root)
    n = len(stages)
    began = time.perf_counter()
    for k, stage in enumerate(stages, 1):
        if is_done(root, stage):
            echo(f"stage {k}/{n}: {stage.name} (done, skipped)")
            continue
        rate = rates(record, default_rates)
        todo = [s for s in stages[k - 1:] if not is_done(root, s)]
        eta = sum(s.units * rate.get(s.kind, 0.0) for s in todo)
        this = stage.units * rate.get(stage.kind, 0.0)
        echo(f"stage {k}/{n}: {stage.name} (estimate {format_seconds(this)}; all remaining stages "
             f"{format_seconds(eta)}, ETA {time.strftime('%H:%M', time.localtime(time.time() + eta))})")
        start = time.perf_counter()
        results = dict(stage.run())
        seconds = time.perf_counter() - start
        record = read_record(root)
        record[stage.name] = {"kind": stage.kind, "units": stage.units, "seconds": seconds}
        _write_json(os.path.join(root, RECORD), record)
        marker = {"seconds": seconds, "results": results}
        if stage.inputs:
            marker["inputs"] = inputs_stamp(root, stage)
        _write_json(marker_path(root, stage.name), marker)
        echo(f"stage {k}/{n}: {stage.name} done in {format_seconds(seconds)}")
    echo(f"all {n} stages done ({format_seconds(time.perf_counter() - began)} in this call)")
    return record
