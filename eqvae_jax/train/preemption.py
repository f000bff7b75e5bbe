"""Stop requests: SIGTERM (TPU preemption, `kill`) asks the loop to save a checkpoint and exit cleanly."""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM; polled by the training loop between steps.

    Single process: our SIGTERM handler sets a flag. Several processes: every host must stop at the same step
    (they all take part in the save), so we install no handler of our own (JAX's preemption service, started by
    `jax.distributed.initialize()`, watches SIGTERM) and agree through `reached_preemption_sync_point`, plus an
    all-gather of explicit `request()`s every `sync_every` steps (not every step: it blocks the host).
    """

    def __init__(self, sync_every: int = 10):
        self._event = threading.Event()
        self._previous = None
        self.sync_every = max(1, sync_every)
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                log.warning("StopRequest: cannot install a SIGTERM handler outside the main thread")

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self._event.set()

    def request(self) -> None:
        self._event.set()

    def should_stop(self, step: int) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            return True
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(jax.numpy.asarray(local))
        return bool(flags.any())

    def restore_handlers(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
