"""Stop requests: SIGTERM (TPU preemption, `kill`) asks the loop to save a checkpoint and exit cleanly."""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class StopRequest:
    """Set by SIGTERM/SIGINT; polled by the training loop between steps.

    With several processes every host must agree on the step at which it stops (they all take part in the
    save), so `should_stop(step)` combines the local flag with JAX's preemption sync point and an all-gather.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                logging.warning("StopRequest: cannot install a handler for %s outside the main thread", sig)

    def _handle(self, signum, frame) -> None:
        logging.warning("received signal %d: will save a checkpoint and stop after this step", signum)
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
        flags = multihost_utils.process_allgather(jax.numpy.asarray(local))
        return bool(flags.any())

    def restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
