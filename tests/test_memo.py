"""memo.cached_when_hashable: one result per hashable arguments, a fresh one for unhashable arguments."""

from eqvae_jax.memo import cached_when_hashable


def test_hashable_arguments_share_a_result_and_unhashable_ones_run_uncached():
    calls = []

    @cached_when_hashable(maxsize=4)
    def build(config, *, scale=1):
        calls.append((config, scale))
        return object()

    assert build((1, 2)) is build((1, 2))
    assert build((1, 2), scale=2) is not build((1, 2))
    assert build([1, 2]) is not build([1, 2])  # a list cannot key the cache: built each time, no TypeError
    assert len(calls) == 4
    assert build.cache_info().currsize == 2
