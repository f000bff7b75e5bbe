"""Shared pieces of the ahead-of-time TPU compile benchmarks (tpu_aot.py, tpu_aot_dit.py, tpu_aot_repa.py,
tpu_aot_maskgit.py).

Compile-only TPU topologies from `jax.experimental.topologies` (the local backend stays CPU; libtpu's compiler
must be importable, see requirements-tpu-aot.txt), the slice table with per-chip peaks and HBM (Cloud TPU docs),
XLA's memory/cost analysis of a compiled program, and one train step's compile report (memory, fit, FLOPs,
step time at a given MFU). Import this module before jax in a script: it sets the
environment so that JAX does not probe for real TPUs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU; TPUs are compile-only topologies
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    topology: str  # jax.experimental.topologies name
    chips: int
    peak_tflops: float  # bf16 dense per chip (Cloud TPU docs)
    hbm_bytes: float
    chip_config: str = ""  # 'megacore': v4's two TensorCores as one device, as on v4 TPU VMs


V4_8 = Target("v4-8", "v4:2x2x1", 4, 275.0, 32 * GIB, "megacore")
V5P_8 = Target("v5p-8", "v5p:2x2x1", 4, 459.0, 95e9)
V5E_8 = Target("v5e-8", "v5e:2x4", 8, 197.0, 16e9)
V5E_16 = Target("v5e-16", "v5e:4x4", 16, 197.0, 16e9)
V6E_8 = Target("v6e-8", "v6e:2x4", 8, 918.0, 32e9)


def topology_devices(target: Target) -> np.ndarray:
    """The compile-only devices of the target slice (checked against its chip count)."""
    kwargs = {"chip_config_name": target.chip_config} if target.chip_config else {}
    topo = topologies.get_topology_desc(target.topology, "tpu", **kwargs)
    devices = np.asarray(topo.devices)
    if len(devices) != target.chips:
        raise RuntimeError(f"{target.topology}: {len(devices)} devices, expected {target.chips}")
    return devices


def topology_mesh(target: Target, data: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over the target's devices: `data` rows, the rest on 'fsdp'."""
    devices = topology_devices(target)
    return Mesh(devices.reshape(data, -1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def memory_report(compiled: Any) -> dict[str, float]:
    """Per-chip bytes from XLA's memory analysis: arguments + outputs - donated aliases + temporaries."""
    mem = compiled.memory_analysis()
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    per_chip += mem.temp_size_in_bytes
    return {
        "args_gib": mem.argument_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "per_chip_gib": per_chip / GIB,
    }


def xla_flops(compiled: Any) -> float:
    """FLOPs of the compiled (per-device, SPMD-partitioned) program from XLA's cost analysis; NaN if absent."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


_USED = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


def hbm_used_from_error(message: str) -> float | None:
    """GiB the TPU compiler says a too-large program needs ('Used 45.2G of 31.2G hbm'), if the message says."""
    m = _USED.search(message)
    return float(m.group(1)) * _UNITS[m.group(2)] / GIB if m else None


def is_out_of_memory(error: Exception) -> bool:
    """The TPU compiler refuses a program that cannot fit in HBM with RESOURCE_EXHAUSTED."""
    return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every chip of the ('data', 'fsdp') mesh: how a job's step receives its batch."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def abstract_key() -> jax.ShapeDtypeStruct:
    """The shape of a typed PRNG key, the step's last argument."""
    return jax.eval_shape(lambda: jax.random.key(0))


def step_seconds(flops: float, target: Target, mfu: float) -> float:
    """Step time implied by `flops` on the whole slice at `mfu` of the bf16 peak."""
    return flops / (target.chips * target.peak_tflops * 1e12 * mfu)


def compile_report(step: Any, args: tuple, target: Target, flops: float, mfu: float) -> dict[str, Any]:
    """Lower and compile the jitted `step` on abstract `args`; seconds, memory per chip, whether it fits in HBM,
    XLA's and the model's TFLOPs per step, and the step time at `mfu` (key 'step_s')."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = memory_report(compiled)
    return {"compile_s": seconds, **mem, "fits": mem["per_chip_gib"] * GIB < target.hbm_bytes,
            "xla_tflop": xla_flops(compiled) * target.chips / 1e12, "model_tflop": flops / 1e12,
            "step_s": step_seconds(flops, target, mfu)}
