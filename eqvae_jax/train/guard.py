"""The non-finite policy of every job.

Device side, inside a jitted step: a step whose loss, gradients or new parameters are not finite is not
applied (`all_finite` + `select`) and the step reports `nonfinite` = the number of updates it skipped.
Host side, in the loop: `NonFiniteCounter` reads those counts once per log interval (and before every save);
after `limit` consecutive micro-steps with a skip the run stops with `NonFiniteError`, without saving, so the
last good checkpoint stays the latest.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def all_finite(tree: Any) -> jax.Array:
    """True iff every floating leaf of `tree` is finite (a scalar bool array, usable under jit)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` if ok else `old` (a bad step is not applied).

    One `lax.cond` over the whole tree rather than a `jnp.where` per leaf: XLA fuses per-leaf selects into the
    backward pass and compiles the generator step ~6x slower (measured 92 s vs 15 s on CPU for the demo model).
    """
    return jax.lax.cond(ok, lambda n, o: n, lambda n, o: o, new, old)


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
                f"update {update}: {self.consecutive} consecutive steps had non-finite loss, gradients or "
                f"parameters ({self.total} skipped in all) and were not applied; stopping without saving. The "
                "last good checkpoint is intact; lower the learning rate or check the data before resuming."
            )
        if self.consecutive:
            log.warning("update %d: %d consecutive non-finite steps skipped (%d in all)", update,
                        self.consecutive, self.total)
