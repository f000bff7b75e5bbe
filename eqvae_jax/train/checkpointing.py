"""Orbax checkpoints of a whole run: train state, host RNG state, data iterator state and config.

One composite item per step:
  state   the jax train state (StandardSave), restored onto abstract targets that carry the *current*
          shardings, so a run resumes on a different device count;
  host    JSON: host-side RNG state (the equivariance-transform sampler) and counters;
  data    the Grain iterator (grain.checkpoint handler), optional;
  config  JSON of the run's config, for humans and for checking a resume uses a compatible config.
Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint as the latest. Saving is asynchronous; `close()` waits for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    every_steps: int = 1000  # save interval (in the loop's unit: optimizer updates)
    max_to_keep: int = 3  # keep the last N ...
    keep_every: int | None = None  # ... plus every step divisible by K (None: none)
    async_save: bool = True


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    host: dict[str, Any]
    config: dict[str, Any] | None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the leaves' current shardings: the restore target for `tree`."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Save/restore whole-run checkpoints under `directory` (usually WORKDIR/checkpoints)."""

    def __init__(self, directory: str, options: CheckpointOptions = CheckpointOptions()):
        self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs:// stays a URL
        self.options = options
        manager_options = ocp.CheckpointManagerOptions(
            max_to_keep=options.max_to_keep,
            keep_period=options.keep_every,
            enable_async_checkpointing=options.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=manager_options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.options.every_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        host: dict[str, Any],
        config: dict[str, Any] | None = None,
        data_iterator: Any = None,
    ) -> None:
        """Start saving `step` (asynchronous unless disabled). Callers never pass non-finite state."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "host": ocp.args.JsonSave(host)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def restore(self, step: int, target_state: Any, data_iterator: Any = None) -> Restored:
        """Restore `step` onto the shapes/shardings of `target_state`; `data_iterator` is restored in place."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_like(target_state)),
            "host": ocp.args.JsonRestore(),
        }
        saved_items = self._item_names(step)
        if "config" in saved_items:
            items["config"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            if "data" not in saved_items:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data iterator state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return Restored(step, restored["state"], dict(restored["host"]), restored.get("config"))

    def _item_names(self, step: int) -> set[str]:
        path = epath.Path(self.directory) / str(step)
        return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()

    def read_json(self, step: int, names: tuple[str, ...] = ("host", "config")) -> dict[str, Any]:
        """The JSON items (host state, config) of a checkpoint that has them, without restoring any arrays."""
        saved = self._item_names(step)
        wanted = [n for n in names if n in saved]
        if not wanted:
            return {}
        out = self._manager.restore(step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in wanted}))
        return {n: dict(out[n]) for n in wanted}

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
