"""XLA_FLAGS for the tests' fake CPU devices (no imports: conftest uses it before JAX is imported).

XLA:CPU runs a program on N host devices as N threads that meet at each collective (all-reduce, all-gather),
and it ends the process (LOG(FATAL): "Termination timeout for `all reduce ...` of 40 seconds exceeded") when
one thread arrives more than `xla_cpu_collective_call_terminate_timeout_seconds` (default 40) after the others.
On a 2-core machine running two pytest workers, a program's first call (its kernels made ready on first use)
next to threads that compile other programs can take that long: the suite lost an xdist worker that way inside
test_eqvqgan_train's resumed run (an abort in `block_until_ready`, then xdist hung). The tests allow 10 minutes,
long enough for any load, short enough to end a true deadlock inside CI's budget. Production keeps XLA's
default: its CPU runs use one device, whose programs have no collectives.
"""

COLLECTIVE_TERMINATE_SECONDS = 600


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` fake CPU devices whose collectives wait out a loaded machine."""
    return (f"--xla_force_host_platform_device_count={devices} "
            f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}")
