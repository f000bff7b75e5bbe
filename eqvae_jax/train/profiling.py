"""A `jax.profiler` trace of a window of updates (the run config's `profile` section), on process 0 only.

The trace goes to WORKDIR/profile (TensorBoard's profile plugin: `tensorboard --logdir WORKDIR/profile`; or
Perfetto: load `WORKDIR/profile/plugins/profile/*/*.trace.json.gz` at ui.perfetto.dev). Tracing does not change
what a step computes; closing the window waits for the traced updates to finish on the devices.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from eqvae_jax.train.config import ProfileConfig

log = logging.getLogger(__name__)


class Profiler:
    """Starts the trace before update `first_update` and stops it after `num_updates` updates (0: never)."""

    def __init__(self, config: ProfileConfig, workdir: str):
        self.first = config.first_update
        self.last = config.first_update + config.num_updates - 1
        self.enabled = config.num_updates > 0 and jax.process_index() == 0
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, update: int) -> None:
        """Call before running `update`; starts the trace at the first update of the window still ahead."""
        if self.enabled and not self.active and self.first <= update <= self.last:
            log.info("profiling updates %d-%d into %s", update, self.last, self.directory)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def after(self, update: int, state: Any) -> None:
        """Call after `update` ran; stops the trace (once `state` is computed) at the end of the window."""
        if self.active and update >= self.last:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        """End the trace if one is running (also on an early return or an error)."""
        if not self.active:
            return
        self.active = False
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        log.info("profile written to %s", self.directory)
