"""Export an EQ-VAE run's autoencoder: a diffusers `AutoencoderKL` directory (+ the Flax weights directory).

Written locally, then copied into place, because the workdir may be on GCS. Used at the end of training and
by `python -m eqvae_jax.export` for any checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.experimental.multihost_utils import process_allgather

from eqvae_jax.convert import kl_vae as convert_kl_vae
from eqvae_jax.models import kl_vae
from eqvae_jax.models.weights import flat_variables


def export_autoencoder(vae_graph: nnx.GraphDef, params: Any, dst: str) -> str:
    """Write DST/diffusers and DST/flax from the autoencoder params (all processes call; process 0 writes)."""
    vae = nnx.merge(vae_graph, jax.device_get(process_allgather(params, tiled=True)))
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            convert_kl_vae.write_diffusers(os.path.join(tmp, "diffusers"), vae.config, flat_variables(vae))
            kl_vae.save(vae, os.path.join(tmp, "flax"))
            for name in ("diffusers", "flax"):
                copy_tree(os.path.join(tmp, name), f"{dst}/{name}")
    return f"{dst}/diffusers"


def copy_tree(src: str, dst: str) -> None:
    """Replace `dst` (local or gs://) with a copy of the local directory `src`."""
    target = epath.Path(dst)
    if target.exists():
        target.rmtree()
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = target / rel if rel != "." else target
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            epath.Path(os.path.join(root, name)).copy(out / name)
