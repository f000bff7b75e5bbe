"""Compile a job's programs for a Cloud TPU slice on any machine, into JAX's persistent compilation cache.

libtpu's compiler runs without TPUs ("compile-only" topologies, `jax.experimental.topologies`). A program
lowered for a topology's devices and compiled with the persistent cache enabled is written to the cache like
any other compile (process 0 writes; the executable is libtpu's serialized TPU executable). A TPU job that
later compiles the same program with the same cache directory finds it when its cache key is the same. JAX
0.10.2's key (`jax._src.cache_key.get`) hashes:

  - the lowered module (shapes, dtypes, shardings, donation; locations stripped) and its name;
  - the jaxlib version, and the backend's platform and platform_version (the compile-only client reports
    libtpu's build, e.g. 'PJRT C API\\nTFRT TPU v5\\nBuilt on ... cl/...': same libtpu on both sides);
  - XLA flags: $XLA_FLAGS, $LIBTPU_INIT_ARGS and --xla* command-line arguments. On a TPU VM, `import jax`
    appends ` --xla_tpu_use_enhanced_launch_barrier=true` to LIBTPU_INIT_ARGS: `prepare_environment` does
    the same here, before libtpu starts;
  - the serialized CompileOptions: replica/partition counts, the device assignment (device ids in mesh
    order: build the mesh with `jax.make_mesh(..., devices=topology devices)`, as the job's
    `jax.make_mesh()` does on the slice), the jax config's effort levels, and debug options. With the default
    `jax_persistent_cache_enable_xla_caches`, the debug options contain CACHE_DIR/xla_gpu_per_fusion_
    autotune_cache_dir even on TPU, so the cache directory string itself is part of the key: precompile with
    exactly the directory string the job uses (e.g. the same gs:// URL);
  - the topology fingerprint of the devices (`xla_client.get_topology_for_devices`), the compression and a
    custom hook ('').

Two of these cannot be checked without a TPU: the real client's platform_version and its topology's
fingerprint. `write_manifest` records them (and the rest) next to the cache entries; `check_manifest`, called
by the job on the slice, says whether the precompiled entries can hit.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

ENV_TOPOLOGY = "EQVAE_COMPILE_ONLY_TOPOLOGY"  # set by `launch/tpu.py precompile`: compile for this slice, then exit
TPU_VM_LIBTPU_ARGS = "--xla_tpu_use_enhanced_launch_barrier=true"  # jax's cloud_tpu_init adds it on TPU VMs
MANIFEST_PREFIX = "eqvae-precompile-"

# (generation, size) -> topology name, for the default shapes of power-of-two slices. v4/v5p sizes count
# TensorCores (2 per chip, one JAX device per chip: v4 as 'megacore'); v5e/v6e sizes count chips.
_CUBE = ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16", "16x16x16",
         "16x16x24"]
_PLANE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_name(accelerator: str) -> tuple[str, dict[str, str]]:
    """'v5p-8' -> ('v5p:2x2x1', {}), 'v4-8' -> ('v4:2x2x1', {'chip_config_name': 'megacore'}), 'v5e-16' /
    'v5litepod-16' -> ('v5e:4x4', {}), 'v6e-8' -> ('v6e:2x4', {}); a 'gen:AxBxC' name passes through."""
    if ":" in accelerator:
        kwargs = {"chip_config_name": "megacore"} if accelerator.startswith("v4:") else {}
        return accelerator, kwargs
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not m:
        raise ValueError(f"unknown accelerator type {accelerator!r}")
    family, size = m.group(1), int(m.group(2))
    if family in ("v4", "v5p"):
        chips = size // 2
        shapes = {math.prod(int(n) for n in s.split("x")): s for s in _CUBE}  # chips -> shape
        if size % 8 or chips not in shapes:
            raise ValueError(f"{accelerator}: no default topology; pass the name, e.g. '{family}:4x4x12'")
        return f"{family}:{shapes[chips]}", ({"chip_config_name": "megacore"} if family == "v4" else {})
    gen = "v6e" if family == "v6e" else "v5e"
    if size not in _PLANE:
        raise ValueError(f"{accelerator}: {gen} slices have {sorted(_PLANE)} chips")
    return f"{gen}:{_PLANE[size]}", {}


def compile_only_target() -> str | None:
    """The slice this process compiles for instead of training ('v5p-8'), set by `launch/tpu.py precompile`.

    A job that supports the mode checks this first: prepare_environment(), mesh over topology_devices(),
    abstract state and batches with the job's shardings, compile_for_topology() for every program the run
    will need (each step variant, eval, summaries), write_manifest(), exit without touching the workdir's
    checkpoints.
    """
    return os.environ.get(ENV_TOPOLOGY) or None


def prepare_environment() -> None:
    """Make this process's compile-relevant environment that of a TPU VM job. Call before jax starts libtpu.

    LIBTPU_INIT_ARGS gets the flag `import jax` adds on a TPU VM (it is part of the cache key); JAX stays on
    the CPU locally and skips the metadata server; libtpu's lock file is not taken (a compile-only client can
    share the machine with another one).
    """
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    if TPU_VM_LIBTPU_ARGS not in args:
        os.environ["LIBTPU_INIT_ARGS"] = args + " " + TPU_VM_LIBTPU_ARGS
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(accelerator: str) -> list[Any]:
    """The compile-only devices of a slice ('v5p-8' or 'v5p:2x2x1'); needs libtpu importable."""
    from jax.experimental import topologies  # deferred: callers set the environment first

    name, kwargs = topology_name(accelerator)
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)


def topology_mesh(devices: Sequence[Any], data: int = -1, fsdp: int = 1):
    """The job's ('data', 'fsdp') mesh over topology devices, ordered as `jax.make_mesh()` orders the slice's
    real devices (same physical coordinates, so the same device assignment in the cache key)."""
    import jax

    from eqvae_jax.parallel.mesh import AXES, mesh_shape

    shape = mesh_shape(len(devices), data, fsdp)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=list(devices))


def enable_cache(cache_dir: str) -> None:
    """The persistent cache at `cache_dir` (the job's exact string), writing every entry however fast."""
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _entries(cache_dir: str, module_name: str) -> set[str]:
    from etils import epath

    path = epath.Path(cache_dir)
    return {p.name for p in path.glob(f"{module_name}-*")} if path.exists() else set()


def compile_for_topology(jitted: Any, *args: Any, cache_dir: str, **kwargs: Any) -> tuple[Any, str | None]:
    """AOT-compile `jitted` for abstract `args` (jax.ShapeDtypeStruct with shardings on topology devices, the
    way the job passes them) with the persistent cache at `cache_dir`; returns (Compiled, the cache entry
    written or found, None if none).

    The shardings (in `args` or the jit's in_shardings) decide the target devices; nothing runs.
    """
    import jax
    from jax._src import compilation_cache  # whether the process's cache is already open (on another dir)

    if compilation_cache._cache_initialized and jax.config.jax_compilation_cache_dir != cache_dir:
        raise ValueError(f"the persistent cache of this process is open at {jax.config.jax_compilation_cache_dir!r}; "
                         f"JAX cannot switch it to {cache_dir!r}")
    enable_cache(cache_dir)
    lowered = jitted.lower(*args, **kwargs)
    m = re.search(r"module @([\w.$-]+)", lowered.as_text())
    module_name = m.group(1) if m else None
    before = _entries(cache_dir, module_name) if module_name else set()
    compiled = lowered.compile()
    after = _entries(cache_dir, module_name) if module_name else set()
    new = sorted(after - before)
    return compiled, (new[0] if new else (sorted(after)[0] if len(after) == 1 else None))


def _live_facts(devices: Sequence[Any], cache_dir: str) -> dict[str, Any]:
    import jax
    import jaxlib
    from jax._src.lib import xla_client

    client = devices[0].client
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": client.platform,
        "platform_version": client.platform_version,
        "topology_fingerprint": int(xla_client.get_topology_for_devices(list(devices)).fingerprint()),
        "device_kind": devices[0].device_kind,
        "device_ids": [int(d.id) for d in devices],
        "device_coords": [list(getattr(d, "coords", ())) for d in devices],
        "LIBTPU_INIT_ARGS": sorted(os.environ.get("LIBTPU_INIT_ARGS", "").split()),
        "XLA_FLAGS": sorted(f for f in os.environ.get("XLA_FLAGS", "").split()
                            if not f.startswith("--xla_force_host_platform_device_count")),
        "cache_dir": cache_dir,
        "xla_caches": jax.config.jax_persistent_cache_enable_xla_caches,
    }


def write_manifest(accelerator: str, devices: Sequence[Any], cache_dir: str, entries: Sequence[str]) -> str:
    """Record what the precompiled entries were keyed on: CACHE_DIR/eqvae-precompile-<topology>.json."""
    from etils import epath

    name, _ = topology_name(accelerator)
    path = epath.Path(cache_dir) / f"{MANIFEST_PREFIX}{name.replace(':', '-')}.json"
    path.write_text(json.dumps({"topology": name, **_live_facts(devices, cache_dir), "entries": sorted(entries)},
                               indent=2))
    return str(path)


def check_manifest(cache_dir: str, devices: Sequence[Any] | None = None) -> list[str]:
    """On the slice, before compiling: what differs between this process and the precompile run whose
    manifest is in `cache_dir` for this topology (empty: the precompiled entries can hit; the caller logs).

    `devices`: the job's mesh devices in mesh order (default jax.devices(), as jax.make_mesh orders them only
    for multi-dimensional meshes: pass mesh.devices.flat for an exact check).
    """
    import jax
    from etils import epath

    devices = list(devices) if devices is not None else jax.devices()
    manifests = list(epath.Path(cache_dir).glob(f"{MANIFEST_PREFIX}*.json")) if epath.Path(cache_dir).exists() \
        else []
    if not manifests:
        return [f"no precompile manifest in {cache_dir}"]
    live = _live_facts(devices, cache_dir)
    best: list[str] | None = None
    for path in manifests:
        saved = json.loads(path.read_text())
        diffs = [f"{k}: precompiled {saved.get(k)!r}, here {v!r}" for k, v in live.items() if saved.get(k) != v]
        if best is None or len(diffs) < len(best):
            best = diffs
    return best or []
