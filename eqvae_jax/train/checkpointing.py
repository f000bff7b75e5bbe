"""Orbax checkpoints of a whole run: train state, host RNG state, data iterator state and config.

One composite item per step:
  state   the jax train state (StandardSave), restored onto abstract targets that carry the *current*
          shardings, so a run resumes on a different device count;
  host    JSON: host-side RNG state (the equivariance-transform sampler) and counters;
  data    the Grain iterator (grain.checkpoint handler), optional;
  config  JSON of the run's config, for humans and for checking a resume uses a compatible config.
Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint as the latest. Saving is asynchronous; `close()` waits for it.

Replicated arrays are written by one replica unless a per-replica slice is at least REPLICA_PARALLEL_MIN_BYTES
and the job has several processes (`use_array_handler`): Orbax's default slices every replicated array across
its replicas, which compiles a `jit(slice)` program per leaf shape and device on a run's first save (30 s for
150 small leaves on 8 CPU devices, measured) and gains nothing within one process.

A step damaged later (a truncated or deleted file, a lost manifest or iterator state) is found by
`restore_newest`: a structural check of the step's files (the same shared files on every process, so every
process reaches the same verdict) and then the restore itself (the processes agree on its outcome); a step that
fails either is skipped for the next older one, and once an older step restores each skipped one is moved
aside to `<step>.damaged` (never deleted) with one warning. If no step restores nothing is moved (a failure
of every step points at the run's setup, not at damage) and CheckpointError lists each step and its cause.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from eqvae_jax import storage
from eqvae_jax.train.errors import CheckpointError  # noqa: F401  (re-exported: checkpointing.CheckpointError)

log = logging.getLogger(__name__)
DAMAGED = ".damaged"  # suffix of a step directory moved aside because it does not restore
REPLICA_PARALLEL_MIN_BYTES = 1 << 20  # smaller replica slices: one replica writes the whole array


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


_registered_for: list[int] = []  # the process count the jax.Array handler was registered for


def use_array_handler() -> None:
    """Register the jax.Array handler every save uses (see the module docstring), once per process: replica-parallel
    writes only across processes and only for slices of at least REPLICA_PARALLEL_MIN_BYTES. Orbax logs a warning
    for every override of its default handler; it is kept off the console."""
    processes = jax.process_count()
    if _registered_for == [processes]:
        return
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=processes > 1,
                                             min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.set_verbosity(verbosity)
    _registered_for[:] = [processes]


class Checkpointer:
    """Save/restore whole-run checkpoints under `directory` (usually WORKDIR/checkpoints)."""

    def __init__(self, directory: str, options: CheckpointOptions = CheckpointOptions()):
        use_array_handler()
        self.directory = storage.resolve(directory)
        self.options = options
        manager_options = ocp.CheckpointManagerOptions(
            max_to_keep=options.max_to_keep,
            keep_period=options.keep_every,
            enable_async_checkpointing=options.async_save,
            create=True,
        )
        self._multiprocessing = manager_options.multiprocessing_options
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
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception:
            self._join_restore_barrier()
            raise
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return Restored(step, restored["state"], dict(restored["host"]), restored.get("config"))

    def _join_restore_barrier(self) -> None:
        """After this process's restore failed: the barrier Orbax's `Checkpointer.restore` ends with (its only
        collective), which the other processes are waiting at when they read their shards fine. Without it the
        processes' next collectives pair up wrongly and the job aborts instead of falling back together."""
        if jax.process_count() == 1:
            return
        options = self._multiprocessing
        ocp.multihost.sync_global_processes(
            ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=options.barrier_sync_key_prefix),
            processes=options.active_processes)

    def _item_names(self, step: int) -> set[str]:
        path = epath.Path(self.directory) / str(step)
        return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()

    def problem(self, step: int, with_data: bool) -> str | None:
        """What is structurally wrong with `step`'s files (None: nothing found), read the same way on every
        process: the composite metadata, the state's metadata and OCDBT manifests, the JSON items, and (with
        `with_data`) every process's iterator state."""
        root = epath.Path(self.directory) / str(step)
        try:
            items = set(json.loads((root / "_CHECKPOINT_METADATA").read_text()).get("item_handlers") or {})
        except (OSError, ValueError) as e:
            return f"_CHECKPOINT_METADATA unreadable ({_short(e)})"
        needed = {"state", "host"} | ({"data"} if with_data else set())
        if needed - items:
            return f"no {', '.join(sorted(needed - items))} item"
        state = root / "state"
        missing = [n for n in ("_METADATA", "manifest.ocdbt") if not (state / n).is_file()]
        missing += [f"{d.name}/manifest.ocdbt" for d in state.glob("ocdbt.process_*") if
                    not (d / "manifest.ocdbt").is_file()]
        if missing:
            return f"state/{', state/'.join(missing)} missing"
        json_files = [f"{n}/metadata" for n in ("host", "config") if n in items]
        if with_data:
            n = jax.process_count()
            json_files += [f"data/process_{i}-of-{n}.json" for i in range(n)]
        for name in json_files:
            try:
                json.loads((root / name).read_text())
            except FileNotFoundError:
                return f"{name} missing"
            except (OSError, ValueError) as e:
                return f"{name} unreadable ({_short(e)})"
        return None

    def set_aside(self, step: int) -> str:
        """Move `step` to `<step>.damaged` (`.damaged.K` if taken; process 0 renames, all wait); its new path."""
        base = epath.Path(self.directory)
        target, k = base / f"{step}{DAMAGED}", 1
        while target.exists():
            target, k = base / f"{step}{DAMAGED}.{k}", k + 1
        _sync(f"checkpoint_set_aside_{step}_named")  # every process has chosen the name before it is taken
        if jax.process_index() == 0:
            (base / str(step)).rename(target)
        _sync(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return os.fspath(target)

    def restore_newest(self, target_state: Any, data_iterator: Any = None,
                       check: Callable[[Mapping[str, Any] | None], None] | None = None) -> Restored | None:
        """Restore the newest step that restores (None: no checkpoint), moving damaged ones aside.

        `check(saved_config)` runs before a step's arrays are read (e.g. the resume check); what it raises
        propagates. Raises CheckpointError when steps exist but none restores.
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            cause = self.problem(step, data_iterator is not None)
            if cause is None:
                try:
                    saved = self.read_json(step, ("config",)).get("config")
                except Exception as e:  # noqa: BLE001 - any failure to read a step means it is damaged
                    cause = f"config unreadable ({_short(e)})"
                else:
                    if check is not None:
                        check(saved)
                    restored = None
                    try:
                        with _quiet_failed_reads():
                            restored = self.restore(step, target_state, data_iterator)
                    except Exception as e:  # noqa: BLE001
                        cause = _short(e)
                    cause = _agree(cause)
                    if cause is None:
                        for bad, why in failures:  # only now: an older step restores, so these are damaged
                            moved = self.set_aside(bad)
                            log.warning("checkpoint: step %d does not restore (%s); moved it to %s, resuming "
                                        "from step %d", bad, why, moved, step)
                        return restored
            failures.append((step, cause))
        if failures:  # nothing moved: a failure of every step is more likely this run's setup than damage
            raise CheckpointError(f"no checkpoint in {self.directory} restores (nothing was moved):\n  "
                                  + "\n  ".join(f"step {s}: {why}" for s, why in failures))
        return None

    def read_json(self, step: int, names: tuple[str, ...] = ("host", "config")) -> dict[str, Any]:
        """The JSON items (host state, config) of a checkpoint that has them, without restoring any arrays."""
        saved = self._item_names(step)
        wanted = [n for n in names if n in saved]
        if not wanted:
            return {}
        out = self._manager.restore(step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in wanted}))
        return {n: dict(out[n]) for n in wanted}

    def read_run(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, its host state and config) of checkpoint `step`, or of the newest when None (for the commands
        that sample or score a finished run); FileNotFoundError when the directory holds no checkpoint."""
        step = step or self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        return step, self.read_json(step, ("host", "config"))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _short(error: BaseException, limit: int = 240) -> str:
    """The root cause of `error` on one line (Orbax wraps a TensorStore error in pages of array specs)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(cause: str | None) -> str | None:
    """This process's restore failure, or another's: every process of a job calls this once per attempted step
    (each reads only its own shards), so all keep or all reject the step together."""
    if jax.process_count() == 1:
        return cause
    from jax.experimental import multihost_utils

    ok = np.asarray(multihost_utils.process_allgather(np.array(int(cause is None), np.int32))).reshape(-1)
    failed = [i for i, v in enumerate(ok) if not v]
    return cause or (f"process(es) {failed} could not read it" if failed else None)


class _quiet_failed_reads:
    """After a failed Orbax restore its abandoned reads finish on a closed event loop: each prints 'RuntimeError:
    Event loop is closed' or 'Exception ignored in: <coroutine ...>' (pages of TensorStore specs) through
    sys.unraisablehook, hundreds of tracebacks for one damaged file, some before the failure reaches us. So from
    the first restore on, exactly those are dropped (the closed-loop error, the exceptions and never-awaited
    warnings of Orbax coroutines); every other unraisable error still prints."""

    def __enter__(self) -> None:
        if getattr(sys.unraisablehook, "_eqvae", False):
            return
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            code = getattr(unraisable.object, "cr_code", None)
            if (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in
                    str(unraisable.exc_value)) or (code is not None and "orbax" in code.co_filename):
                return
            previous(unraisable)

        hook._eqvae = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning, r"orbax\.")

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        if error is not None:
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
        return False
