"""Exponential moving average of parameters, the one implementation every job uses."""

from __future__ import annotations

from typing import Any

import jax


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """decay * ema + (1 - decay) * params, leaf by leaf (decay 1 keeps the EMA, e.g. between accumulated
    micro-steps)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
