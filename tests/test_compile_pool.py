"""The compile pool (train/compile_pool.py) and the EQ-VAE job's order of first use (train/eqvae/compile_order.py)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np

from eqvae_jax.losses import equivariance as eq
from eqvae_jax.train import compile_variants
from eqvae_jax.train.compile_pool import CompilePool, memory_map_warning
from eqvae_jax.train.eqvae import compile_order

HW = (32, 32)
TRANSFORM = eq.TransformConfig(p_equivariance=0.5, p_lowres=0.25, scale_numerators=(8, 12, 16, 20, 24, 28),
                               scale_denominator=32, rotations=(1, 2, 3))


def _scaled(x: jax.Array, factor: int) -> jax.Array:
    return x * factor


SCALED = jax.jit(_scaled, static_argnums=(1,))


def test_programs_compile_in_submission_order_and_a_late_one_is_waited_for_and_logged():
    logs: list[str] = []
    pool = CompilePool(1, logs.append)
    started: list[int] = []
    gate = threading.Event()
    x = jax.ShapeDtypeStruct((4,), jnp.float32)

    def compile_fn(factor: int):
        def fn():
            started.append(factor)
            if factor == 3:
                gate.wait()  # still compiling when the loop asks for it
            return SCALED.lower(x, factor).compile()
        return fn

    for factor in (2, 3, 5):
        pool.submit("scaled", factor, compile_fn(factor))
    pool.submit("scaled", 2, compile_fn(7))  # a key submitted again is ignored
    threading.Timer(0.2, gate.set).start()
    tracker = compile_variants.VariantTracker("scaled", 3, logs.append, pool=pool, static_argnums=(1,))
    ones = jnp.ones(4)
    with compile_variants.compile_timer() as main_thread:
        outs = [tracker(f, SCALED, ones, f) for f in (3, 2, 5, 3)]
    assert compile_variants.BACKEND_COMPILE not in main_thread  # compiled in the pool's thread, not on first call
    assert all(r.backend_compile_s > 0 for r in tracker.records.values())  # measured there
    assert [np.asarray(o).tolist() for o in outs] == [[3.0] * 4, [2.0] * 4, [5.0] * 4, [3.0] * 4]
    assert started == [2, 3, 5]
    assert any("waiting for program [3]" in m for m in logs) and any("program [3] ready after" in m for m in logs)
    assert sum("compiled ahead" in m for m in logs) == 3 and tracker.count == 3
    assert pool.progress()["compile/ready"] == 3 and pool.all_ready_after() is not None
    pool.close()


def test_a_key_the_pool_never_got_compiles_on_first_call():
    pool = CompilePool(1, lambda _: None)
    logs: list[str] = []
    tracker = compile_variants.VariantTracker("scaled", None, logs.append, pool=pool, static_argnums=(1,))
    assert float(tracker(11, SCALED, jnp.ones(4), 11)[0]) == 11.0
    assert len(logs) == 1 and "compiled ahead" not in logs[0] and "new compiled variant" in logs[0]
    pool.close()


def _replay(sampler: eq.TransformSampler, micro_steps: range, pretrain: int, shared: bool):
    """The job's own draw rule (train/eqvae/job.py `train_step`), run for real."""
    seen: list[tuple[str, eq.BranchPlan]] = []
    for micro in micro_steps:
        g = compile_order.PLAIN_PLAN if micro < pretrain else sampler.draw().plan(HW)[0]
        d = g if shared else (compile_order.PLAIN_PLAN if micro < pretrain else sampler.draw().plan(HW)[0])
        for program in (("g_step", g), ("d_step", d)):
            if program not in seen:
                seen.append(program)
    return seen


def test_need_order_is_the_order_the_run_first_uses_each_program_and_does_not_advance_the_sampler():
    for shared, pretrain, micro_steps in ((False, 0, range(0, 3000)), (True, 5, range(3, 3000)),
                                          (False, 0, range(0, 6))):
        sampler = eq.TransformSampler(TRANSFORM, seed=7)
        for _ in range(11):  # a resumed run: the sampler is part-way through its stream
            sampler.draw()
        before = sampler.state()
        order = compile_order.programs_in_need_order(TRANSFORM, before, HW, micro_steps, pretrain, shared)
        assert sampler.state() == before
        assert order == _replay(sampler, micro_steps, pretrain, shared)
        if len(micro_steps) > 100:  # a long run needs every program there is
            plans = set(eq.all_plans(TRANSFORM, HW))
            assert {p for n, p in order if n == "g_step"} == plans
            assert {p for n, p in order if n == "d_step"} == plans
        else:  # a short one only what it draws
            assert len(order) <= 2 * len(micro_steps)


def test_memory_map_warning_names_the_limit_and_the_fix_on_cpu_only(tmp_path):
    limit = tmp_path / "max_map_count"
    limit.write_text("65530\n")
    warning = memory_map_warning(98, "cpu", str(limit))
    assert warning and "vm.max_map_count = 65,530" in warning and "sysctl -w vm.max_map_count=262144" in warning
    assert memory_map_warning(10, "cpu", str(limit)) is None  # the demo's 10 programs fit
    assert memory_map_warning(98, "tpu", str(limit)) is None
    assert memory_map_warning(98, "cpu", str(tmp_path / "absent")) is None  # not Linux
    limit.write_text("1048576\n")
    assert memory_map_warning(98, "cpu", str(limit)) is None
