"""Test setup: 8 fake CPU devices for sharding tests, fp32 matmuls, XLA's fastest compile, PyTorch reference helpers
on sys.path, and one persistent XLA compilation cache for the whole run."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from cpu_devices import compile_as_production, xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))  # 8 fake devices, patient collectives, fast compiles
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never download anything
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# fp32 matmuls, as an environment variable so that the jobs tests start in subprocesses compile the same programs
# as the tests' in-process runs and share their entries in the compilation cache (the key includes the precision)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# XLA's cheapest compile (LLVM at -O0, its expensive passes off; `jax_disable_most_optimizations`), also inherited
# by the jobs tests start in subprocesses: the suite compiles hundreds of tiny programs and runs each a few times,
# so compiling is most of its CPU time. Measured on the busy 2-core machine (CPU seconds, this flag off -> on):
# the tiny EQ-VAE job 86 -> 60, the Inception/LPIPS/KL-VAE/DINOv2 parity modules 94 -> 70, test_replicate.py
# 292 -> 237. Results move by float32 rounding only (a few ulps: LLVM orders and fuses arithmetic differently; the
# parity tolerances hold); production keeps the defaults.
# EQVAE_TEST_XLA_OPTIMIZE=1 compiles the suite as production does.
if not compile_as_production():
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# MLIR locations with one source line per operation instead of the full Python traceback (JAX's default keeps up
# to 100 frames per operation): lowering is a fifth of the suite's CPU time and building those locations a large
# part of it (test_eqvae_train's ahead-compile test: 60.7 -> 53.3 CPU seconds). Metadata only: the compiled
# programs and their cache keys are the same.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "torch_refs"))


def shared_jax_cache() -> str:
    """The directory every job of this test run uses as its persistent compilation cache (`$EQVAE_TEST_JAX_CACHE`).

    JAX's cache key includes the cache directory's path string, so jobs that name different directories never
    share a compiled program. With one path for all of them, a program compiled by one test module (or one xdist
    worker, or a job the tests start in a subprocess) is loaded by the next instead of being compiled again. The
    process that creates it (the xdist controller: its workers and their subprocesses inherit the variable)
    removes it at exit; a directory set by the caller is kept, so it also carries over to the next run."""
    path = os.environ.get("EQVAE_TEST_JAX_CACHE")
    if not path:
        path = tempfile.mkdtemp(prefix="eqvae-tests-jax-cache-")
        os.environ["EQVAE_TEST_JAX_CACHE"] = path
        atexit.register(shutil.rmtree, path, True)
    return path


shared_jax_cache()


def pytest_collection_modifyitems(config, items):
    """`torch`: tests of modules that use a PyTorch reference (select with -m torch / deselect with -m 'not torch').

    Order: modules by `SUITE_SECONDS` (a module's rough wall time on a 2-core machine, declared by the longest
    modules) descending, then the other modules with slow tests, most slow tests first, then the rest; each
    module's tests stay together and in order. With `-n auto --dist loadfile` (xdist's reordering by test count
    off in pyproject's addopts) the longest files start first, on different workers, and the short ones fill the
    gaps instead of one worker running two long files back to back at the end."""
    import pytest

    weight: dict[str, tuple[float, int]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and "torch" in vars(module):
            item.add_marker(pytest.mark.torch)
        path = str(item.path)
        seconds, slow = weight.get(path, (-float(getattr(module, "SUITE_SECONDS", 0)), 0))
        weight[path] = (seconds, slow - (item.get_closest_marker("slow") is not None))
    items.sort(key=lambda item: weight[str(item.path)])  # stable: keeps the order within each group
