"""Per-process memoization for builders of jitted functions and abstract models.

JAX caches a trace per jitted *function object*: a job that builds a new `jax.jit` closure on every run traces and
lowers its programs again even when they are the same, which is most of what a second run in one process costs
(a resumed run, a test's reference run, the replication's control arm). The builders decorated here return the
same object for equal arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def cached_when_hashable(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)`, except that a call with an unhashable argument (a config holding a list,
    say) runs uncached instead of raising."""

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                hash((args, tuple(sorted(kwargs.items()))))
            except TypeError:
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate
