"""Bookkeeping for the bounded set of compiled variants of a jitted step (one per static `BranchPlan`).

    g_tracker = VariantTracker("g_step", expected=len(all_plans(cfg, image_hw)))
    out = g_tracker(plan, g_step, state, batch, plan, rot_k, key)   # key first, then the call

The first call per key is blocked on and timed; the XLA compile time spent inside it is read from JAX's own
monitoring events (tracing, lowering, backend compile), so the number is compile time, not run time. Each new
variant is logged once (count / expected, key, seconds). `compile_events()` counts backend compiles process-wide,
which lets a test prove that nothing recompiles once every key has been seen. With a `pool`
(train/compile_pool.py) a key compiled ahead runs that executable instead of compiling on first call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol, TypeVar

import jax
from jax import monitoring

T = TypeVar("T")
log = logging.getLogger(__name__)

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
BACKEND_COMPILE = COMPILE_EVENTS[-1]

_lock = threading.Lock()
_backend_compiles = 0
_local = threading.local()


def _listener(event: str, duration_secs: float, **_: Any) -> None:
    global _backend_compiles
    if event not in COMPILE_EVENTS:
        return
    if event == BACKEND_COMPILE:
        with _lock:
            _backend_compiles += 1
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink[event] = sink.get(event, 0.0) + duration_secs


monitoring.register_event_duration_secs_listener(_listener)


def compile_events() -> int:
    """Backend (XLA) compilations in this process so far, from JAX's monitoring events."""
    return _backend_compiles


@contextlib.contextmanager
def compile_timer() -> Iterator[dict[str, float]]:
    """Collects the compile-phase durations (seconds per JAX event) of this thread inside the block."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink = {}
    try:
        yield sink
    finally:
        _local.sink = previous
        if previous is not None:
            for k, v in sink.items():
                previous[k] = previous.get(k, 0.0) + v


@dataclasses.dataclass
class VariantRecord:
    """First call of one variant: wall time (compile + first run) and its compile phases (s)."""

    first_call_s: float
    trace_s: float
    lower_s: float
    backend_compile_s: float

    @property
    def compile_s(self) -> float:
        return self.trace_s + self.lower_s + self.backend_compile_s

    @classmethod
    def from_phases(cls, first_call_s: float, phases: dict[str, float]) -> VariantRecord:
        """From `compile_timer()`'s per-event seconds."""
        return cls(first_call_s, phases.get(COMPILE_EVENTS[0], 0.0), phases.get(COMPILE_EVENTS[1], 0.0),
                   phases.get(BACKEND_COMPILE, 0.0))


class ProgramSource(Protocol):
    """Where programs compiled ahead come from (train/compile_pool.CompilePool)."""

    def has(self, name: str, key: Hashable) -> bool: ...

    def take(self, name: str, key: Hashable) -> Any: ...  # .compiled, .record (a VariantRecord)


class VariantTracker:
    """Counts, times and logs the compiled variants of one jitted function, keyed by its static arguments."""

    def __init__(self, name: str, expected: int | None = None, logger: Callable[[str], None] | None = None,
                 pool: ProgramSource | None = None, static_argnums: tuple[int, ...] = ()):
        self.name = name
        self.expected = expected
        self.records: dict[Hashable, VariantRecord] = {}
        self._log = logger or log.info
        self._pool = pool
        self._static = frozenset(static_argnums)  # positions of `fn`'s static arguments (a compiled program's
        self._programs: dict[Hashable, Callable[..., Any]] = {}  # call leaves them out)

    def _run_ahead(self, key: Hashable, *args: Any) -> Any:
        return self._programs[key](*(a for i, a in enumerate(args) if i not in self._static))

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def ahead_count(self) -> int:
        """Variants whose program came from the compile pool (not compiled on first call)."""
        return len(self._programs)

    def __call__(self, key: Hashable, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if key in self._programs:
            return self._run_ahead(key, *args)
        if key in self.records:
            return fn(*args, **kwargs)
        if self._pool is not None and self._pool.has(self.name, key):
            return self._first_call_ahead(key, *args)
        start = time.perf_counter()
        with compile_timer() as phases:
            out = jax.block_until_ready(fn(*args, **kwargs))
        self._record(key, VariantRecord.from_phases(time.perf_counter() - start, phases), "compile", "")
        return out

    def _first_call_ahead(self, key: Hashable, *args: Any) -> Any:
        start = time.perf_counter()
        ready = self._pool.take(self.name, key)
        self._programs[key] = ready.compiled
        out = jax.block_until_ready(self._run_ahead(key, *args))
        rec = dataclasses.replace(ready.record, first_call_s=time.perf_counter() - start)
        self._record(key, rec, "compiled ahead in", " incl. any wait")
        return out

    def _record(self, key: Hashable, rec: VariantRecord, how: str, first_call_note: str) -> None:
        """Keep and log a new variant's record (once per key); warn past the expected bound."""
        self.records[key] = rec
        bound = "" if self.expected is None else f"/{self.expected}"
        self._log(
            f"{self.name}: new compiled variant {self.count}{bound} [{key}]: {how} {rec.compile_s:.2f}s "
            f"(trace {rec.trace_s:.2f}, lower {rec.lower_s:.2f}, xla {rec.backend_compile_s:.2f}), "
            f"first call {rec.first_call_s:.2f}s{first_call_note}"
        )
        if self.expected is not None and self.count > self.expected:
            log.warning("%s: %d compiled variants, more than the expected %d", self.name, self.count, self.expected)

    def summary(self) -> dict[str, float]:
        """Totals for a metrics/log line: variants, total and max compile seconds."""
        c = [r.compile_s for r in self.records.values()]
        return {
            f"{self.name}/variants": float(self.count),
            f"{self.name}/compile_s_total": float(sum(c)),
            f"{self.name}/compile_s_max": float(max(c, default=0.0)),
        }
