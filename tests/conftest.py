"""Test setup: 8 fake CPU devices for sharding tests, fp32 matmuls, and PyTorch reference helpers on sys.path."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never download anything
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "torch_refs"))


def pytest_collection_modifyitems(config, items):
    """`torch`: tests of modules that use a PyTorch reference (select with -m torch / deselect with -m 'not torch').

    Order: modules marked slow as a whole first, then modules with some slow tests, then the rest (each module's
    tests stay together and in order). With `-n auto --dist loadfile` the longest files start first and the short
    ones fill the gaps, instead of one worker finishing a long file alone at the end."""
    import pytest

    weight: dict[str, int] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and "torch" in vars(module):
            item.add_marker(pytest.mark.torch)
        path = str(item.path)
        whole = module is not None and any(getattr(m, "name", "") == "slow" for m in
                                           _as_list(getattr(module, "pytestmark", [])))
        some = item.get_closest_marker("slow") is not None
        weight[path] = min(weight.get(path, 2), 0 if whole else 1 if some else 2)
    items.sort(key=lambda item: weight[str(item.path)])  # stable: keeps the order within each group


def _as_list(marks):
    return marks if isinstance(marks, list) else [marks]
