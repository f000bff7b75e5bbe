"""The non-finite policy of every job.

Device side, inside a jitted step: a step whose loss or gradients are not finite is not applied
(`all_finite` + `update_if`) and the step reports `nonfinite` = the number of updates it skipped. The
optimizer update runs inside the guard's taken branch, so a good step costs no copy of the state: finite
gradients applied to finite parameters and moments give finite Adam moments, parameters and EMA (an
overflow to inf in a moment needs gradients above 1e19), so the new parameters are not checked again.
Host side, in the loop: `NonFiniteCounter` reads those counts once per log interval (and before every save);
after `limit` consecutive micro-steps with a skip the run stops with `NonFiniteError`, without saving, so the
last good checkpoint stays the latest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
T = TypeVar("T")


def all_finite(tree: Any) -> jax.Array:
    """True iff every floating leaf of `tree` is finite (a scalar bool array, usable under jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def update_if(ok: jax.Array, update: Callable[[], T], current: T) -> T:
    """`update()` if ok else `current`: a bad step is not applied, and a good one is computed in place.

    One `lax.cond` whose taken branch computes the update (optimizer, EMA) from the values it closes over. The
    earlier form, a cond choosing between a finished new state and the old one, kept both alive and copied one
    into the result: 1.3 s per generator step of the SD-VAE at 256 px on CPU (84M parameters, two Adam
    moments, the EMA). A `jnp.where` per leaf would fuse into the backward pass and compile the generator step
    ~6x slower (measured 92 s vs 15 s on CPU for the demo model).
    """
    return jax.lax.cond(ok, update, lambda: current)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left untouched."""


class NonFiniteCounter:
    """Consecutive and total skipped micro-steps, from the per-step `nonfinite` metric."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.consecutive = limit, total, 0

    def update(self, skipped: float) -> None:
        skipped = int(round(float(skipped)))
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0

    def check(self, update: int) -> None:
        """Raise NonFiniteError at the limit; warn about a current run of skips."""
        if self.consecutive >= self.limit:
            raise NonFiniteError(
                f"update {update}: {self.consecutive} consecutive steps had non-finite loss or gradients "
                f"({self.total} skipped in all) and were not applied; stopping without saving. The "
                "last good checkpoint is intact; lower the learning rate or check the data before resuming."
            )
        if self.consecutive:
            log.warning("update %d: %d consecutive non-finite steps skipped (%d in all)", update,
                        self.consecutive, self.total)
