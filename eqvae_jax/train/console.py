"""What a run prints: its own progress, readable, with library logs out of the way.

- `setup_logging(level)`: our loggers (`eqvae_jax.*`) print INFO lines to stdout; absl, Orbax, Grain, JAX and
  TensorFlow are set to `level` (default WARNING), so their INFO chatter is off unless asked for.
- `progress_line`: one line per log interval (update, chosen metrics, branch mix, steps/s, ETA).
- `parameter_table`: a start-up overview of parameter counts and bytes per network.
- `table`: small aligned tables (eval results, end-of-run summary).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

LIBRARY_LOGGERS = ("absl", "orbax", "grain", "jax", "tensorflow", "etils", "clu", "tensorboard", "urllib3",
                   "matplotlib")  # TF imports keras, keras matplotlib: its font cache line on a fresh machine
_FORMAT = "%(asctime)s %(message)s"


def setup_logging(library_level: str | int = "WARNING") -> None:
    """Our progress on stdout at INFO; third-party loggers at `library_level`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF's oneDNN notice ignores the log level
    level = logging.getLevelName(library_level.upper()) if isinstance(library_level, str) else library_level
    ours = logging.getLogger("eqvae_jax")
    if not any(getattr(h, "_eqvae", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._eqvae = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(absl_logging.converter.standard_to_absl(level))


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def number(x: float) -> str:
    """Compact: 4 significant digits, scientific when very large or small."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def progress_line(update: int, total: int, scalars: Mapping[str, float], fields: Sequence[tuple[str, str]],
                  rate: float | None, eta_s: float | None, note: str | None = None) -> str:
    """'update 120/300 (40%) | g 1.234e3 d 0.98 | 2.10 upd/s | ETA 1m25s' for the (label, key) `fields`;
    `note` (e.g. 'compiling: ...' when the interval held only the compiling first update) ends the line."""
    parts = [f"update {update}/{total} ({100.0 * update / total:.0f}%)"]
    shown = [f"{label} {number(scalars[key])}" for label, key in fields if key in scalars]
    if shown:
        parts.append(" ".join(shown))
    if rate:
        parts.append(f"{rate:.3g} upd/s")
    if eta_s is not None and update < total:
        parts.append(f"ETA {duration(eta_s)}")
    if note:
        parts.append(note)
    return " | ".join(parts)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """An aligned plain-text table."""
    cells = [[str(c) for c in r] for r in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parameter_table(groups: Mapping[str, Any]) -> str:
    """Parameters and bytes per named pytree (networks, optimizer state), plus device memory if reported."""
    rows = []
    for name, tree in groups.items():
        leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
        count = sum(int(np.prod(x.shape)) for x in leaves)
        size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
        rows.append((name, f"{count / 1e6:.2f}M", f"{size / 2**20:.1f} MiB"))
    text = table(rows, ("", "parameters", "bytes"))
    stats = jax.local_devices()[0].memory_stats() if hasattr(jax.local_devices()[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        text += (f"\ndevice memory: {stats.get('bytes_in_use', 0) / 2**30:.2f} of "
                 f"{stats['bytes_limit'] / 2**30:.1f} GiB in use on {jax.local_devices()[0].device_kind}")
    return text
