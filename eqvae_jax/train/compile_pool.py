"""Compile a job's step programs ahead of need, several at a time, in a thread pool.

A step with several static variants (the EQ-VAE job compiles one generator and one discriminator program per
(branch, scale)) would otherwise compile lazily, one program at a time, the first time each is drawn: on a
fresh TPU run that is hours of start-up. The job submits every program it will need, in the order it will
first need it (`submit`: a thunk that lowers and compiles); XLA's compiler releases the GIL, so the threads
compile in parallel. `VariantTracker(..., pool=...)` then runs the ready program and waits (logging the
wait) only when the next draw's program is still compiling. Programs go through JAX's persistent compilation
cache like lazily compiled ones, so a restart finds them there.

    pool = CompilePool(workers=8)
    pool.submit("g_step", plan, lambda: g_step.lower(*abstract_args, plan).compile())
    tracker = VariantTracker("g_step", expected, pool=pool, static_argnums=(5,))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

import jax

from eqvae_jax.train.compile_variants import VariantRecord, compile_timer

log = logging.getLogger(__name__)


MAX_DEFAULT_WORKERS = 16  # each concurrent compile holds its own HLO and buffers in host memory
CPU_MAPS_PER_PROGRAM = 1000  # measured: ~900 per EQ-VAE step program (benchmarks/compile_ahead.py, 98 programs)
MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"


def default_workers() -> int:
    """Compile threads when the config says 0: the host's CPU count (XLA compiles one program per thread), at
    most 16 so that a TPU VM host with 200+ vCPUs does not hold ~100 large compiles in memory at once."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def memory_map_warning(programs: int, backend: str, limit_file: str = MAP_COUNT_FILE) -> str | None:
    """Why `programs` compiled programs may not fit in one CPU-backend process, or None.

    XLA:CPU links each kernel of each program into memory mappings of its own; past Linux's vm.max_map_count
    (65530 by default) mmap fails and the process dies ('LLVM compilation error: Cannot allocate memory', then
    a segfault). The reference grid's 98 programs of even the tiny model need ~89,000. TPU/GPU: not affected."""
    if backend != "cpu" or not os.path.exists(limit_file):
        return None
    with open(limit_file) as f:
        limit = int(f.read().split()[0])
    need = programs * CPU_MAPS_PER_PROGRAM
    if need <= limit:
        return None
    return (f"{programs} programs on the CPU backend need about {need:,} memory mappings, more than "
            f"vm.max_map_count = {limit:,}: the process would die compiling them ('LLVM compilation error: Cannot "
            f"allocate memory'). Raise the limit (sudo sysctl -w vm.max_map_count={max(262144, 2 * need)}) or "
            f"use fewer scales.")


@dataclasses.dataclass
class Ready:
    """A program compiled ahead: the executable and the compile phases measured in its thread."""

    compiled: jax.stages.Compiled
    record: VariantRecord
    finished_at: float  # time.perf_counter() when compiling ended


class CompilePool:
    """Compiles submitted programs in submission order on `workers` threads; `take` hands one out."""

    def __init__(self, workers: int, logger: Callable[[str], None] | None = None):
        self.workers = workers or default_workers()
        self.started_at = time.perf_counter()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="compile")
        self._futures: dict[tuple[str, Hashable], concurrent.futures.Future[Ready]] = {}
        self._lock = threading.Lock()
        self._log = logger or log.info
        self.waited_s = 0.0

    def submit(self, name: str, key: Hashable, compile_fn: Callable[[], jax.stages.Compiled]) -> None:
        """Queue one program (ignored if this (name, key) was submitted before)."""
        with self._lock:
            if (name, key) not in self._futures:
                self._futures[(name, key)] = self._executor.submit(self._compile, name, key, compile_fn)

    def _compile(self, name: str, key: Hashable, compile_fn: Callable[[], jax.stages.Compiled]) -> Ready:
        start = time.perf_counter()
        with compile_timer() as phases:
            compiled = compile_fn()
        end = time.perf_counter()
        log.debug("%s: compiled ahead [%s] in %.2fs", name, key, end - start)
        return Ready(compiled, VariantRecord.from_phases(end - start, phases), end)

    def has(self, name: str, key: Hashable) -> bool:
        return (name, key) in self._futures

    def take(self, name: str, key: Hashable) -> Ready:
        """The compiled program for (name, key), waiting for it if it is still compiling (the wait is logged)."""
        future = self._futures[(name, key)]
        if not future.done():
            queued = sum(not f.done() for f in self._futures.values())
            self._log(f"{name}: waiting for program [{key}] (compiling ahead; {queued} not ready yet)")
            start = time.perf_counter()
            concurrent.futures.wait([future])
            waited = time.perf_counter() - start
            self.waited_s += waited
            self._log(f"{name}: program [{key}] ready after a {waited:.2f}s wait")
        return future.result()

    def progress(self) -> dict[str, float]:
        """Scalars for the log line: programs submitted, compiled, and seconds the loop waited for them."""
        done = [f for f in self._futures.values() if f.done()]
        return {"compile/programs": float(len(self._futures)), "compile/ready": float(len(done)),
                "compile/waited_s": self.waited_s}

    def all_ready_after(self) -> float | None:
        """Seconds from the pool's start until its last program was compiled (None while any is pending)."""
        futures = list(self._futures.values())
        if not all(f.done() for f in futures):
            return None
        ends = [f.result().finished_at for f in futures if f.exception() is None]
        return max(ends, default=self.started_at) - self.started_at

    def close(self) -> None:
        """Drop the programs not started yet; those compiling finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
