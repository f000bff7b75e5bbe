"""Keep freed heap memory in the process on the CPU backend, so XLA:CPU's buffers are not page-faulted in afresh
on every step.

XLA:CPU allocates each execution's temporary buffer (gigabytes for an autoencoder step) and its outputs with
malloc and frees them when the step ends. glibc serves blocks that large with mmap and unmaps them on free, so the
next step touches brand-new pages: about 0.8 million minor page faults per EQ-VAE G step at 256 px, paid inside
whichever op first writes each page. On the 2-core Intel VM that was about 4 s of a 15 s equivariance micro-step
(docs/cpu_speed.md, "Page faults"). Three glibc settings keep that memory mapped instead: no mmap for large blocks
(`M_MMAP_MAX=0`), never trim the heap's top (`M_TRIM_THRESHOLD`), and one arena (`M_ARENA_MAX=1`, so the XLA
threads' big blocks also come from the main heap: other arenas cannot grow past 64 MiB and mmap those blocks
anyway). The process then keeps its peak heap until it exits, which is what a training process does anyway.

`tune_for_cpu()` sets them with `mallopt` when the job will run on the CPU (no TPU or GPU plugin installed, or
`JAX_PLATFORMS` starting with cpu), on glibc only, and must run before JAX starts its backend (threads made
before it may already own an arena). It leaves the allocator alone when the user chose settings of their own
(any `MALLOC_*` tuning variable set) or set `EQVAE_MALLOC=system`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# glibc reads these at start-up; any of them set means the user tuned malloc already.
USER_TUNING = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TOP_PAD_")
OPT_OUT = "EQVAE_MALLOC"  # "system": leave glibc's defaults
_outcome = "system malloc (tune_for_cpu not called)"


def accelerator_plugin_installed() -> bool:
    """Whether JAX would find a TPU or GPU backend (libtpu, or a `jax_plugins` package such as the CUDA plugin)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    spec = importlib.util.find_spec("jax_plugins")  # the namespace package plugins install into
    locations = spec.submodule_search_locations if spec else None
    return any(entry.name != "__pycache__" for path in locations or () if os.path.isdir(path)
               for entry in os.scandir(path))


def runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugin_installed()


def outcome() -> str:
    """What the last `tune_for_cpu` did (for a benchmark's header)."""
    return _outcome


def tune_for_cpu() -> str:
    """Apply the settings when they apply; returns (and remembers, `outcome`) what was done."""
    global _outcome
    _outcome = _decide_and_apply()
    return _outcome


def _decide_and_apply() -> str:
    if os.environ.get(OPT_OUT, "").lower() == "system":
        return f"system malloc ({OPT_OUT}=system)"
    if user := [k for k in USER_TUNING if k in os.environ]:
        return f"system malloc with the user's {', '.join(user)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system malloc (not glibc)"
    if not runs_on_cpu():
        return "system malloc (accelerator backend)"
    libc = ctypes.CDLL("libc.so.6")
    # mallopt takes an int; -1 becomes SIZE_MAX in glibc's size_t trim threshold: never trim.
    done = [libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, -1), libc.mallopt(M_ARENA_MAX, 1)]
    if not all(done):
        return "system malloc (mallopt refused)"
    return "malloc keeps freed memory (M_MMAP_MAX=0, no trim, 1 arena)"
