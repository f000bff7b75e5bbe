"""torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` (pure torch) as an independent reference, loaded offline.

torch-fidelity is installed outside the venv (`launch/setup.sh --dev` puts it in .venv/side/torch_fidelity;
`TORCH_FIDELITY_DIR` overrides): its package `__init__` imports torchvision, which does not load beside the CPU
torch wheel, and with it installed torchmetrics imports it and breaks. So a stub package whose `__path__` is the
install directory is registered just long enough to import the two pure-torch modules, then removed from
`sys.modules` again (torchmetrics must not find it later in the same test session).
"""

from __future__ import annotations

import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIDE_DIR = os.environ.get("TORCH_FIDELITY_DIR", os.path.join(REPO, ".venv", "side", "torch_fidelity"))
INSTALL = "pip install --no-deps --target .venv/side/torch_fidelity torch-fidelity==0.4.0 (launch/setup.sh --dev)"


def available() -> bool:
    return os.path.isfile(os.path.join(SIDE_DIR, "torch_fidelity", "feature_extractor_inceptionv3.py"))


def load_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(feature_extractor_inceptionv3, interpolate_compat_tensorflow) from the side install."""
    import importlib

    if not available():
        raise FileNotFoundError(f"torch-fidelity is not installed at {SIDE_DIR}: {INSTALL}")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [os.path.join(SIDE_DIR, "torch_fidelity")]
    sys.modules["torch_fidelity"] = stub
    try:
        fe = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        interp = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return fe, interp


def feature_extractor(weights_path: str):
    """`FeatureExtractorInceptionV3` returning ('2048', 'logits_unbiased') with the weights file `weights_path`
    (a state dict in its own names; its loader is strict, so every name and shape is checked)."""
    fe, _ = load_modules()
    return fe.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
    ).eval()
