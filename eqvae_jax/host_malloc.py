"""Keep freed heap memory in the process on the CPU backend, so XLA:CPU's buffers are not page-faulted in afresh
on every step.

XLA:CPU allocates each execution's temporary buffer (gigabytes for an autoencoder step) and its outputs with
malloc and frees them when the step ends. glibc serves blocks that large with mmap and unmaps them on free, so the
next step touches brand-new pages: about 0.8 million minor page faults per EQ-VAE G step at 256 px, paid inside
whichever op first writes each page; on the 2-core Intel VM about 2 s of an 11 s G step (docs/cpu_speed.md,
"Page faults"). What keeps that memory mapped:

- glibc: no mmap for large blocks (`M_MMAP_MAX=0`) and never trim the heap's top (`M_TRIM_THRESHOLD`), so a
  freed block stays in the heap for the next step;
- JAX: run single-device CPU computations inline on the calling thread (`jax_cpu_enable_async_dispatch=False`)
  rather than on the CPU client's dispatch thread. That thread allocates from its own glibc arena, which cannot
  grow past 64 MiB and mmaps bigger blocks whatever the settings above; the main thread's arena is the heap.
  (`M_ARENA_MAX=1` would put every thread on the heap too, but then XLA's compiler threads contend for one arena:
  the G step compiled in 34-37 s instead of 25.)

The process keeps its peak heap until it exits, which is what a training process does anyway. A multi-device CPU
computation still runs on the client's threads (JAX dispatches those asynchronously in any case).

`tune_for_cpu()` applies both when the job will run on the CPU (no TPU or GPU plugin installed, or `JAX_PLATFORMS`
starting with cpu), on glibc only, and must run before JAX starts its backend. It leaves things alone when the
user chose settings of their own (any `MALLOC_*` tuning variable, or `JAX_CPU_ENABLE_ASYNC_DISPATCH`, set) or set
`EQVAE_MALLOC=system`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# glibc reads these at start-up (JAX its flag at import); any of them set means the user chose already.
USER_TUNING = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TOP_PAD_", "JAX_CPU_ENABLE_ASYNC_DISPATCH")
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
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return "system malloc (mallopt refused)"
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "malloc keeps freed memory (M_MMAP_MAX=0, no trim; CPU computations run inline)"
