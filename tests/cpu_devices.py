"""XLA_FLAGS for the tests' fake CPU devices and fast compiles (no JAX: conftest uses it before JAX is imported).

XLA:CPU runs a program on N host devices as N threads that meet at each collective (all-reduce, all-gather),
and it ends the process (LOG(FATAL): "Termination timeout for `all reduce ...` of 40 seconds exceeded") when
one thread arrives more than `xla_cpu_collective_call_terminate_timeout_seconds` (default 40) after the others.
On a 2-core machine running two pytest workers, a program's first call (its kernels made ready on first use)
next to threads that compile other programs can take that long: the suite lost an xdist worker that way inside
test_eqvqgan_train's resumed run (an abort in `block_until_ready`, then xdist hung). The tests allow 10 minutes,
long enough for any load, short enough to end a true deadlock inside CI's budget. Production keeps XLA's
default: its CPU runs use one device, whose programs have no collectives.

Compiling is most of a tiny job's CPU time (the suite runs hundreds of tiny programs a few times each), and
XLA:CPU's MLIR fusion emitters are a third of a compile even at -O0: with `--xla_cpu_use_fusion_emitters=false`
XLA emits fused elementwise ops and reductions with its older LLVM loop emitters instead. Measured on the quiet
2-core VM, the tiny EQ-VAE job (`configs/sdvae_ft.py:tiny`, fresh process, empty cache, -O0): 53-55 -> 39-41 CPU
seconds, its XLA compiles 33-35 -> 21-22 s; its losses and evaluation numbers printed to the last digit
unchanged. Production keeps XLA's default; `EQVAE_TEST_XLA_OPTIMIZE=1` (conftest.py) drops this flag too.
"""

import os

COLLECTIVE_TERMINATE_SECONDS = 600
FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def compile_as_production() -> bool:
    """`EQVAE_TEST_XLA_OPTIMIZE=1`: the suite compiles as production does (neither -O0 nor this module's flags)."""
    return os.environ.get("EQVAE_TEST_XLA_OPTIMIZE") == "1"


def compile_flags() -> str:
    """XLA_FLAGS of the suite's fast compiles (for a process with XLA's one default CPU device)."""
    return "" if compile_as_production() else FAST_COMPILE_FLAGS


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` fake CPU devices whose collectives wait out a loaded machine, compiled fast."""
    flags = [f"--xla_force_host_platform_device_count={devices}",
             f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}", compile_flags()]
    return " ".join(f for f in flags if f)
