"""Compile-only TPU programs seed JAX's persistent compilation cache (eqvae_jax.parallel.aot).

The compile test needs libtpu's compiler outside the venv (requirements-tpu-aot.txt; default /opt/libtpu_aot,
or $LIBTPU_AOT_PATH) and is skipped where it is not installed. Each case runs in a fresh process (libtpu
starts once per process and must not start in the test process): a program compiled for a v5p-8 topology is
written to the cache under a key a second process computes again (a hit, nothing new written), the second
process finds nothing different in the first one's manifest, and the same directory reached through another
path string gets another key (the cache directory string is part of JAX's key).
"""

import json
import os
import subprocess
import sys

import pytest

from eqvae_jax.parallel import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.environ.get("LIBTPU_AOT_PATH", "/opt/libtpu_aot")
needs_libtpu = pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU, "libtpu")),
                                  reason=f"libtpu (compile-only TPU compiler) not installed at {LIBTPU}")

SCRIPT = """
import json, sys
from eqvae_jax.parallel import aot
aot.prepare_environment()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

cache_dir = sys.argv[1]
devices = aot.topology_devices("v5p-8")
mesh = aot.topology_mesh(devices, data=-1, fsdp=1)
batch = NamedSharding(mesh, P(("data", "fsdp")))

def step(w, x):
    return jnp.tanh(x @ w).sum(axis=0)

jitted = jax.jit(step, in_shardings=(NamedSharding(mesh, P()), batch))
compiled, entry = aot.compile_for_topology(
    jitted, jax.ShapeDtypeStruct((128, 128), jnp.float32), jax.ShapeDtypeStruct((32, 128), jnp.float32,
    sharding=batch), cache_dir=cache_dir)
problems = aot.check_manifest(cache_dir, list(mesh.devices.flat))  # against the previous run's manifest
aot.write_manifest("v5p-8", list(mesh.devices.flat), cache_dir, [entry])
print(json.dumps({"entry": entry, "mesh_ids": [d.id for d in mesh.devices.flat], "kind": devices[0].device_kind,
                  "problems": problems, "platform_version": devices[0].client.platform_version}))
"""


def compile_in_subprocess(cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, LIBTPU]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("LIBTPU_INIT_ARGS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_entries(path) -> list[str]:
    return sorted(p for p in os.listdir(path) if p.startswith("jit_step-"))


def test_topology_names():
    assert aot.topology_name("v5p-8") == ("v5p:2x2x1", {})
    assert aot.topology_name("v5p-128") == ("v5p:4x4x4", {})
    assert aot.topology_name("v4-32") == ("v4:2x2x4", {"chip_config_name": "megacore"})
    assert aot.topology_name("v5e-16") == aot.topology_name("v5litepod-16") == ("v5e:4x4", {})
    assert aot.topology_name("v6e-8") == ("v6e:2x4", {})
    assert aot.topology_name("v5p:4x4x12") == ("v5p:4x4x12", {})
    with pytest.raises(ValueError, match="no default topology"):
        aot.topology_name("v5p-24")
    with pytest.raises(ValueError, match="unknown accelerator"):
        aot.topology_name("v3-8")


@needs_libtpu
def test_compile_only_programs_are_cache_hits_in_a_new_process(tmp_path):
    cache = tmp_path / "cache"
    first = compile_in_subprocess(str(cache))
    assert first["entry"] and first["entry"].endswith("-cache") and cache_entries(cache) == [first["entry"]]
    assert first["kind"] == "TPU v5" and first["platform_version"].startswith("PJRT C API\nTFRT TPU v5")
    assert first["problems"] == [f"no precompile manifest in {cache}"]
    second = compile_in_subprocess(str(cache))
    assert second["entry"] == first["entry"] and cache_entries(cache) == [first["entry"]]  # read, not rewritten
    assert second["problems"] == []  # everything the key depends on (that the manifest records) is the same

    # The same directory under another name: JAX puts CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir into the
    # compile options it hashes, so the key changes with the directory string.
    alias = tmp_path / "alias"
    alias.symlink_to(cache)
    third = compile_in_subprocess(str(alias))
    assert third["entry"] != first["entry"] and len(cache_entries(cache)) == 2
    assert third["problems"] == [f"cache_dir: precompiled {str(cache)!r}, here {str(alias)!r}"]
    manifest = json.loads((cache / "eqvae-precompile-v5p-2x2x1.json").read_text())
    assert manifest["cache_dir"] == str(alias) and manifest["LIBTPU_INIT_ARGS"] == [aot.TPU_VM_LIBTPU_ARGS]
