"""FID Inception weights -> eqvae-jax weights directory: `--kind inception --src SRC --dst DST`.

SRC is the PyTorch port of TF's inception-2015-12-05 graph: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
or torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the same tensors under the same names: the
module names of torchvision's `Inception3` without AuxLogits, e.g. `Mixed_6d.branch1x1.conv.weight`,
`Mixed_6d.branch1x1.bn.running_var`, `fc.weight`), or any state dict saved from either package's network.
BatchNorm `num_batches_tracked` counters (newer PyTorch saves them) and `fc.bias` (ADM's Inception Score uses
the unbiased logits, so the network never adds it) are skipped and listed in the summary.

Only `--to flax`: the network is frozen, so there is nothing trained to export back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from eqvae_jax.convert.atomic import atomic_path
from eqvae_jax.convert.key_map import KeyMap, Row
from eqvae_jax.convert.options import check_destination, check_target, typed_options
from eqvae_jax.convert.torch_files import read_state_dict
from eqvae_jax.eval import inception as inception_model
from eqvae_jax.models.weights import save_weights, variable_shapes

TARGETS = ("flax",)
OPTIONS: dict = {}
SKIPPED = ("fc.bias",)
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def key_map() -> KeyMap:
    """One row per variable of the FID network, derived from its NNX paths (which follow the torch names)."""
    rows = []
    for key in sorted(variable_shapes(inception_model.abstract())):
        *module, leaf = key.split("/")
        prefix = ".".join(module)
        if key == "fc/kernel":
            rows.append(Row(key, "fc.weight", "linear"))
        elif leaf == "kernel":
            rows.append(Row(key, f"{prefix}.weight", "conv"))
        else:
            rows.append(Row(key, f"{prefix}.{_BN[leaf]}"))
    return KeyMap(rows)


def flax_variables(sd: Mapping[str, np.ndarray], what: str = "inception") -> tuple[dict[str, np.ndarray], list[str]]:
    """(flat Flax variables, skipped torch keys); KeyMismatchError names missing / unexpected / mis-shaped keys."""
    skipped = sorted(k for k in sd if k in SKIPPED or k.endswith(".num_batches_tracked"))
    own = {k: v for k, v in sd.items() if k not in skipped}
    return key_map().to_flax(own, variable_shapes(inception_model.abstract()), what), skipped


def convert(src: str, dst: str, to: str = "flax", overwrite: bool = False, **options: str) -> str:
    """Write the Flax weights directory `dst` from the PyTorch file `src`; returns a one-line summary."""
    check_target(inception_model.KIND, to, TARGETS)
    typed_options(inception_model.KIND, options, OPTIONS)
    check_destination(dst, overwrite)
    flat, skipped = flax_variables(read_state_dict(src), what=src)
    counters = sum(k.endswith(".num_batches_tracked") for k in skipped)
    with atomic_path(dst, overwrite) as tmp:
        save_weights(tmp, inception_model.KIND, inception_model.InceptionConfig().to_dict(), flat)
    notes = [k for k in skipped if not k.endswith(".num_batches_tracked")]
    if counters:
        notes.append(f"{counters} BatchNorm num_batches_tracked")
    note = f" (skipped {', '.join(notes)})" if notes else ""
    return f"inception: wrote {len(flat)} frozen arrays to {dst}{note}"
