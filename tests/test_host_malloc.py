"""host_malloc: on the CPU, a large block freed and allocated again reuses pages already mapped (no new faults);
the user's own settings, accelerators and the opt-out leave glibc's defaults alone.

Each case runs in a fresh interpreter: mallopt changes the process for good, and the test measures page faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eqvae_jax import host_malloc

# 256 MiB malloc'd, written, freed, then malloc'd and written again: the faults of the second write. Plain
# malloc, as XLA:CPU uses (NumPy's allocator asks for huge pages, which would hide the faults).
PROBE = """
import ctypes, json, resource
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
print(json.dumps({"outcome": outcome, "faults": faults_of_a_fresh_block()}))
"""
PAGES = (1 << 28) // 4096


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
    assert tuned["faults"] < PAGES // 10, tuned
    default = probe(EQVAE_MALLOC="system")
    assert default["outcome"] == "system malloc (EQVAE_MALLOC=system)"
    assert default["faults"] > PAGES // 2, default  # glibc unmapped the block: every page faults again


@pytest.mark.parametrize("env, expected", [
    ({"MALLOC_ARENA_MAX": "2"}, "system malloc with the user's MALLOC_ARENA_MAX"),
    ({"JAX_PLATFORMS": "tpu"}, "system malloc (accelerator backend)"),
])
def test_the_users_settings_and_accelerators_keep_glibcs_defaults(env, expected):
    assert probe(**env)["outcome"] == expected


def test_the_backend_is_read_from_jax_platforms_without_starting_jax(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
    assert host_malloc.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_malloc.runs_on_cpu()
