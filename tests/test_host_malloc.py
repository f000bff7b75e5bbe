"""host_malloc: on the CPU, a large block freed and allocated again, by malloc or by an XLA step, reuses pages already
mapped (no new faults); the user's own settings, accelerators and the opt-out leave glibc's and JAX's defaults.

Each case runs in a fresh interpreter: mallopt changes the process for good, and the test measures page faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eqvae_jax import host_malloc

# 256 MiB malloc'd, written, freed, then malloc'd and written again: the faults of the second write (plain malloc,
# as XLA:CPU uses; NumPy's allocator asks for huge pages, which would hide the faults). Then the faults of a jitted
# step with a 64 MiB temporary buffer after two warm-up calls: XLA:CPU's own allocations.
PROBE = """
import ctypes, json, os, resource
from eqvae_jax import host_malloc
outcome = host_malloc.tune_for_cpu()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_a_fresh_block():
    block = libc.malloc(1 << 28)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, 1 << 28)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults
faults_of_a_fresh_block()
result = {"outcome": outcome, "faults": faults_of_a_fresh_block()}
if os.environ["JAX_PLATFORMS"] == "cpu":  # (the accelerator case has no backend to run on)
    import jax, jax.numpy as jnp
    x = jnp.ones((1, 1024, 1024, 4), jnp.float32)
    w = jnp.ones((3, 3, 4, 16), jnp.float32)
    # a 64 MiB convolution output summed in the same program: XLA's per-execution temporary buffer
    step = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())
    def faults_of_a_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x, w).block_until_ready()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_a_step(), faults_of_a_step()
    result["step_faults"] = faults_of_a_step()
    result["async_dispatch"] = jax.config.read("jax_cpu_enable_async_dispatch")
print(json.dumps(result))
"""
PAGES = (1 << 28) // 4096
STEP_PAGES = (64 << 20) // 4096


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in host_malloc.USER_TUNING + (host_malloc.OPT_OUT,)}
    clean["JAX_PLATFORMS"] = "cpu"
    clean.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_on_the_cpu_a_freed_block_is_reused_without_page_faults():
    tuned = probe()
    assert tuned["outcome"].startswith("malloc keeps freed memory"), tuned
    assert tuned["faults"] < PAGES // 10 and tuned["step_faults"] < STEP_PAGES // 10, tuned
    assert tuned["async_dispatch"] is False
    default = probe(EQVAE_MALLOC="system")
    assert default["outcome"] == "system malloc (EQVAE_MALLOC=system)"
    # glibc unmapped the block and XLA's result: every page faults again
    assert default["faults"] > PAGES // 2 and default["step_faults"] > STEP_PAGES // 2, default
    assert default["async_dispatch"] is True


@pytest.mark.parametrize("env, expected", [
    ({"MALLOC_ARENA_MAX": "2"}, "system malloc with the user's MALLOC_ARENA_MAX"),
    ({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"}, "system malloc with the user's JAX_CPU_ENABLE_ASYNC_DISPATCH"),
    ({"JAX_PLATFORMS": "tpu"}, "system malloc (accelerator backend)"),
])
def test_the_users_settings_and_accelerators_keep_glibcs_defaults(env, expected):
    assert probe(**env)["outcome"] == expected


def test_the_backend_is_read_from_jax_platforms_without_starting_jax(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
    assert host_malloc.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.runs_on_cpu()
