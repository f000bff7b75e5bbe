"""Coordination between the processes of one multi-host job, over JAX's distributed key-value store.

Two services, both no-ops in a single-process run:

- `make_once(name, make)`: a shared artifact (prepared TFDS data, a cache's metadata) is made by process 0
  while the others wait; then the others call `make` too, which finds the artifact complete on shared storage
  (or, on host-local storage, makes this host's copy). The others wait at most `timeout_s` and stop with a
  message naming what they waited for; if process 0 fails meanwhile they stop with its error.
- `FailureWatch` + `report_failure`: a process whose job raises publishes its error; every other process has a
  watch thread that sees it within a second, prints `process K of N failed: <error>` and exits. Without it the
  survivors sit in a collective until gloo or the coordination service times out (30 s to minutes) and then
  print an error that names neither the failed process nor its cause.

The key-value store is the coordination service that `jax.distributed.initialize()` starts on process 0; it
lives as long as process 0 does, so process 0 waits (briefly) for the others to read its failure before exiting.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFIX = "eqvae_jax"
FAILED, SEEN = f"{PREFIX}/failed/", f"{PREFIX}/seen/"
POLL_S = 0.2


class PeerFailedError(RuntimeError):
    """Another process of the job failed (its error is in the message)."""


class CoordinationTimeout(RuntimeError):
    """Another process did not reach an agreed point in time."""


def _client() -> Any | None:
    """JAX's distributed runtime client, or None in a single-process run."""
    from jax._src import distributed

    if distributed.global_state.client is None or jax.process_count() == 1:
        return None
    return distributed.global_state.client


def describe(error: BaseException) -> str:
    """One line: the exception and where it was raised (the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames \
        else ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}{where}" if text else f"{type(error).__name__}{where}"


def _failures(client: Any) -> dict[int, str]:
    """{process: error} of every process that reported a failure."""
    return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(FAILED)}


def _raise_if_failed(client: Any, waiting_for: str) -> None:
    failed = {k: v for k, v in _failures(client).items() if k != jax.process_index()}
    if failed:
        k = min(failed)
        raise PeerFailedError(f"process {k} of {jax.process_count()} failed while process "
                              f"{jax.process_index()} waited for {waiting_for}: {failed[k]}")


def make_once(name: str, make: Callable[[], T], timeout_s: float = 3600.0) -> T:
    """`make()` on process 0 first, then on the others (see the module doc); returns this process's result.

    `name` identifies the artifact (e.g. its path): any call with the same name after process 0 has made it
    passes straight through, so processes need not call in the same order or the same number of times.
    `make` must be idempotent: a second call finds the artifact and only opens it.
    """
    client = _client()
    if client is None:
        return make()
    key = f"{PREFIX}/made/{hashlib.sha1(name.encode()).hexdigest()[:16]}"
    if jax.process_index() == 0:
        try:
            result = make()
        except BaseException as e:
            client.key_value_set(key, f"failed: {describe(e)}", allow_overwrite=True)
            raise
        client.key_value_set(key, "ok", allow_overwrite=True)
        return result
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" not in str(e):  # the service is gone: process 0 died without a report
                raise PeerFailedError(f"process {jax.process_index()} lost the job's coordination service (on "
                                      f"process 0) while waiting for {name}: {describe(e)}") from None
            status = None
        if status == "ok":
            return make()
        if status is not None:
            raise PeerFailedError(f"process 0 of {jax.process_count()} failed while making {name}: "
                                  f"{status.removeprefix('failed: ')}")
        _raise_if_failed(client, name)
        if time.monotonic() > deadline:
            raise CoordinationTimeout(
                f"process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to make {name}; is process 0 "
                "still running (see its log)?")
        time.sleep(POLL_S)


def report_failure(error: BaseException, exit_code: int, wait_s: float = 10.0) -> None:
    """Publish this process's failure to the others (no-op in a single-process run).

    Process 0 hosts the key-value store, so it then waits up to `wait_s` until every other process has seen the
    failure (or failed itself) before it goes on to exit. The process then exits with `exit_code` once Python's
    own exit work is done (`_exit_without_shutdown`).
    """
    client = _client()
    if client is None:
        return
    me, count = jax.process_index(), jax.process_count()
    try:
        client.key_value_set(f"{FAILED}{me}", describe(error), allow_overwrite=True)
        deadline = time.monotonic() + (wait_s if me == 0 else 0.0)
        while time.monotonic() < deadline:
            told = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(SEEN)} | set(_failures(client))
            if told >= set(range(count)):
                break
            time.sleep(POLL_S)
    except Exception as e:  # the coordination service may be gone already; the failure itself matters more
        log.warning("could not report this process's failure to the others: %s", e)
    _exit_without_shutdown(exit_code)


def _exit_without_shutdown(code: int) -> None:
    """End this process with `code` right after Python's own exit work, skipping JAX's shutdown.

    JAX's exit handler waits at a shutdown barrier for every process; the others are stopping on their own
    (FailureWatch), so the wait would end in a heartbeat time-out (100 s) and a fatal-error dump, and the
    client's destructor aborts the same way once process 0's service is gone. An exit handler registered now
    runs before JAX's (last registered, first run) and leaves with the right status after flushing the logs.
    """

    def leave() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(leave)


class FailureWatch:
    """A daemon thread that ends this process soon after another process of the job reported a failure.

    It exits with status 1 through `os._exit` (the main thread may be blocked in a collective that will never
    complete). Stop it before the job's own normal or error exit (`stop()`, or use it as a context manager).
    """

    def __init__(self, poll_s: float = 0.5, exit: Callable[[int], None] = os._exit):
        self._client = _client()
        self._stopped = threading.Event()
        self._poll_s, self._exit = poll_s, exit
        self._thread: threading.Thread | None = None

    def start(self) -> FailureWatch:
        if self._client is not None:
            self._thread = threading.Thread(target=self._run, name="eqvae-failure-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def __enter__(self) -> FailureWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        me, count = jax.process_index(), jax.process_count()
        while not self._stopped.wait(self._poll_s):
            try:
                failed = {k: v for k, v in _failures(self._client).items() if k != me}
            except Exception:  # the service went away with process 0; JAX's own heartbeat reports that
                return
            if failed and not self._stopped.is_set():
                with contextlib.suppress(Exception):  # only lets process 0 exit sooner
                    self._client.key_value_set(f"{SEEN}{me}", "1", allow_overwrite=True)
                k = min(failed)
                print(f"error: process {k} of {count} failed: {failed[k]}\n"
                      f"error: stopping process {me} too (process {k}'s log has the traceback)",
                      file=sys.stderr, flush=True)
                logging.shutdown()
                self._exit(1)
                return


@contextlib.contextmanager
def failures_shared(handled: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a job's body with a `FailureWatch`; an exception escaping it is reported to the other processes.

    `handled`: the errors the caller turns into a message and exit status 2 (the others exit 1, SystemExit
    with its own code). A peer's failure or a coordination time-out ends this process with its one-line
    message and status 1.
    """
    watch = FailureWatch().start()
    try:
        yield
    except BaseException as e:
        watch.stop()  # this process is ending on its own error: report it, not a peer's
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            code = 2 if isinstance(e, handled) else 1
        if code != 0 and not isinstance(e, KeyboardInterrupt):
            report_failure(e, code)
        if isinstance(e, (PeerFailedError, CoordinationTimeout)):  # the message says it all; no traceback
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    finally:
        watch.stop()
