"""Export a fine-tuning run's autoencoder in its family's format, plus the Flax weights directory:
a KL autoencoder as a diffusers `AutoencoderKL` directory (DST/diffusers), a VQGAN as taming's checkpoint layout
(DST/taming: last.ckpt with a `state_dict` + model.yaml, what taming's VQModel and the MaskGIT code load).

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

from eqvae_jax import storage
from eqvae_jax.convert import kl_vae as convert_kl_vae
from eqvae_jax.convert import vq_vae as convert_vq_vae
from eqvae_jax.models import kl_vae, vq_vae
from eqvae_jax.models.weights import flat_variables


def export_autoencoder(vae_graph: nnx.GraphDef, params: Any, dst: str) -> str:
    """Write DST/diffusers (KL) or DST/taming (VQ), and DST/flax, from the autoencoder params; returns the first.

    All processes call; process 0 writes. Needs no torch (taming's last.ckpt is written by
    `convert.torch_files.write_torch_checkpoint`).
    """
    vae = nnx.merge(vae_graph, jax.device_get(process_allgather(params, tiled=True)))
    name = "taming" if isinstance(vae, vq_vae.VQVAE) else "diffusers"
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "taming":
                convert_vq_vae.write_taming(os.path.join(tmp, name), vae.config, flat_variables(vae))
                vq_vae.save(vae, os.path.join(tmp, "flax"))
            else:
                convert_kl_vae.write_diffusers(os.path.join(tmp, name), vae.config, flat_variables(vae))
                kl_vae.save(vae, os.path.join(tmp, "flax"))
            for out in (name, "flax"):
                copy_tree(os.path.join(tmp, out), f"{dst}/{out}")
    return f"{dst}/{name}"


def copy_tree(src: str, dst: str) -> None:
    """Replace `dst` (local or gs://) with a copy of the local directory `src` (on gs://, commit markers last:
    `storage.publish_tree`)."""
    if storage.is_url(dst):
        storage.publish_tree(src, dst, overwrite=True)
        return
    target = epath.Path(dst)
    if target.exists():
        target.rmtree()
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = target / rel if rel != "." else target
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            epath.Path(os.path.join(root, name)).copy(out / name)
