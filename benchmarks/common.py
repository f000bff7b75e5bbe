"""Shared pieces of the CPU benchmarks: the median timer, the JAX-vs-PyTorch forward comparison that
vae_forward, vq_forward and dinov2_forward run (same flags, same per-batch timing loop, one table row each),
and the train-step table of dit_step and maskgit_step.

Imports nothing heavy at module level, so a script's `--help` stays fast; JAX and torch are imported by the
functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Median wall time of `repeats` calls of `fn`, after `warmup` untimed calls (`fn` must block on its result)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown CPU' elsewhere): ratios measured on one CPU do not carry
    over to another (docs/cpu_speed.md measured 0.96x on one 2-core machine and 1.35x on another)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def first_and_median(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which includes any compile; median of `repeats` calls after `warmup` more)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    return first, median_seconds(fn, repeats, warmup)


def forward_parser(description: str, batch: list[int], size: int, size_help: str) -> argparse.ArgumentParser:
    """The flags every JAX-vs-torch forward benchmark takes: --batch, --size, --repeats, --threads."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=batch, help="batch sizes")
    p.add_argument("--size", type=int, default=size, help=size_help)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per batch size (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    return p


@dataclasses.dataclass
class ForwardTiming:
    """One batch of a JAX-vs-torch forward comparison: the warm-up outputs of both sides and the timings."""

    out_jax: Any  # the jitted function's output (device arrays), from the compile + warm-up call
    out_torch: Any  # the torch function's output, from its warm-up call
    t_jax: float  # median seconds
    t_torch: float
    compile_s: float  # the first JAX call: trace + compile + one run

    def row(self, batch: int, *extra: str) -> str:
        """The table row: batch, JAX s, torch s, torch/JAX (> 1: JAX is faster), `extra` cells, compile s."""
        cells = (f"{batch:>9}", f"{self.t_jax:>9.3f}", f"{self.t_torch:>9.3f}", f"{self.t_torch / self.t_jax:>9.2f}",
                 *extra, f"{self.compile_s:.1f}")
        return " | ".join(cells)


def header(*columns: str) -> str:
    """The table header matching `ForwardTiming.row`: batch, the timings, `columns`, compile s."""
    return " | ".join(f"{h:>9}" for h in ("batch", "jax s", "torch s", "torch/jax", *columns)) + " | jax compile s"


def time_forward(jax_fn: Callable[[Any], Any], torch_fn: Callable[[Any], Any], x: Any, repeats: int
                 ) -> ForwardTiming:
    """Time `jax_fn` (given x on the device) against `torch_fn` (given x as an NCHW tensor) on NHWC float32 `x`:
    one warm-up call each (the JAX one compiles and is timed as compile_s), then the median of `repeats`."""
    import jax
    import numpy as np
    import torch

    x_jax = jax.device_put(x)
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    start = time.perf_counter()
    out_jax = jax.block_until_ready(jax_fn(x_jax))  # compile + warm-up
    compile_s = time.perf_counter() - start
    out_torch = torch_fn(x_torch)  # warm-up
    t_jax = median_seconds(lambda: jax.block_until_ready(jax_fn(x_jax)), repeats)
    t_torch = median_seconds(lambda: torch_fn(x_torch), repeats)
    return ForwardTiming(out_jax, out_torch, t_jax, t_torch, compile_s)


def step_table(rows: list[tuple[str, float]], batch: int, flops: float, rate_digits: int = 1) -> str:
    """Seconds per train step per framework -> a table of ms/step, images/s, model GFLOP/s and time relative
    to the first row (JAX)."""
    lines = [f"{'framework':<20}{'ms/step':>10}{'img/s':>10}{'GFLOP/s':>10}{'vs jax':>8}"]
    for name, sec in rows:
        lines.append(f"{name:<20}{sec * 1e3:>10.1f}{batch / sec:>10.{rate_digits}f}{flops / sec / 1e9:>10.1f}"
                     f"{sec / rows[0][1]:>8.2f}")
    return "\n".join(lines)
