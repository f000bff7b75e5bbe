"""The resumable unit of the reconstruction evaluation: shards of the image stream, one result file per owner.

The evaluated images (the first `num_images` of the split) are cut into consecutive shards of
`EvalVAEConfig.effective_shard_size()` images. For every shard, each owner writes one file when the shard is
done: `_originals` (Inception features of the original crops, shared by every model) and each model (its
per-image metrics, the Inception features of its reconstructions, the latents kept for the intrinsic dimension
and the preview). A rerun reads which (shard, owner) pairs are complete and computes only the rest, so a
preempted 50K evaluation loses at most the shard in flight, and a model added later to a workdir reuses the
originals' features.

Layout (local or gs:// workdirs, through etils.epath):

    WORKDIR/shards/<owner>/shard-00003.npz    the arrays
    WORKDIR/shards/<owner>/shard-00003.json   written last: the shard is complete; its `config` says how

The JSON's `config` records everything the arrays depend on (data, Inception and model fingerprints, seeds,
transforms); a file whose config differs from the run's is an error naming the differences, never silently
mixed into the results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from flax import nnx

from eqvae_jax import storage
from eqvae_jax.models.weights import flat_variables

ORIGINALS = "_originals"  # model names start with a letter or digit, so no model can own this directory
VERSION = 1
log = logging.getLogger(__name__)


class ShardMismatchError(ValueError):
    """A workdir holds shards computed with another configuration."""


def fingerprint(module: nnx.Module | None, config: Mapping[str, Any] | None = None) -> str:
    """sha256 (16 hex digits) of a network's variables and config; '' for None."""
    if module is None:
        return ""
    h = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for key, value in sorted(flat_variables(module).items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Consecutive shards of `total` images, `size` each (the last may be smaller)."""

    total: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.total // self.size)

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.size
        return start, min(start + self.size, self.total)


def differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees, as 'key: saved -> wanted'."""
    if isinstance(saved, Mapping) and isinstance(wanted, Mapping):
        out = []
        for k in sorted(set(saved) | set(wanted), key=str):
            out += differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")
        return out
    if saved != wanted:
        return [f"{prefix.rstrip('.')}: {saved!r} -> {wanted!r}"]
    return []


class ShardStore:
    """Reads and writes the shard files of one workdir (module docstring). Only one process writes."""

    def __init__(self, workdir: str, plan: ShardPlan):
        self.root = epath.Path(workdir) / "shards"
        self.plan = plan

    def _stem(self, owner: str, shard: int) -> epath.Path:
        return self.root / owner / f"shard-{shard:05d}"

    def _meta(self, shard: int, config: Mapping[str, Any]) -> dict[str, Any]:
        start, stop = self.plan.bounds(shard)
        return {"version": VERSION, "shard": shard, "start": start, "stop": stop,
                "config": json.loads(json.dumps(config, default=str))}

    def status(self, owner: str, shard: int, config: Mapping[str, Any]) -> tuple[bool, str | None]:
        """(complete, mismatch message): whether the shard is on disk, and why it cannot be used if not usable."""
        marker = self._stem(owner, shard).with_suffix(".json")
        if not marker.exists():
            return False, None
        try:
            saved = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            log.warning("eval_vae: %s is unreadable (%s); recomputing that shard", marker, e)
            return False, None
        wanted = self._meta(shard, config)
        diff = differences({k: saved.get(k) for k in wanted}, wanted)  # the extras (counts, names) are outputs
        if diff:
            shown = "; ".join(diff[:4]) + (f"; ... {len(diff) - 4} more" if len(diff) > 4 else "")
            return False, (f"{marker} was computed with another configuration ({shown}); use a new --workdir, or "
                           f"delete {self.root / owner} to recompute {owner}")
        return True, None

    def write(self, owner: str, shard: int, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
              **extra: Any) -> None:
        """Write the arrays, then the JSON marker (each atomically: `storage.write_atomic`)."""
        stem = self._stem(owner, shard)
        stem.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        storage.write_atomic(stem.with_suffix(".npz"), buffer.getvalue())
        meta = {**self._meta(shard, config), **extra}
        storage.write_atomic(stem.with_suffix(".json"), json.dumps(meta, indent=1).encode())

    def read(self, owner: str, shard: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        stem = self._stem(owner, shard)
        meta = json.loads(stem.with_suffix(".json").read_text())
        with np.load(io.BytesIO(stem.with_suffix(".npz").read_bytes())) as data:
            return meta, {k: data[k] for k in data.files}


