"""Periodic monitoring of the autoencoder on a few held-out batches: PSNR, SSIM, LPIPS and the equivariance
error, plus image summaries (inputs, reconstructions, transformed inputs, decoded transformed latents).

KL autoencoders: `make_eval_step` / `make_summary_fn` (posterior-sample reconstructions, errors on the posterior
mean). VQGANs: `make_vq_eval_step` / `make_vq_summary_fn` (reconstructions through the codebook, errors on the
pre-quantization features, the fraction of code indices that commute with rotations, and the codebook usage and
perplexity of the held-out images' codes).

This is monitoring on `eval.batches` batches, not the paper's evaluation on 50K ImageNet-val images with rFID
(that is `configs/eval_vae.py` / the evaluation suite)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather
from PIL import Image

from eqvae_jax import storage
from eqvae_jax.data.iterator import build_eval_iterator
from eqvae_jax.eval import equivariance as eq_eval
from eqvae_jax.eval import reconstruction
from eqvae_jax.images import row_grid
from eqvae_jax.losses import resample
from eqvae_jax.memo import cached_when_hashable
from eqvae_jax.models import vq_vae

SUMMARY_SCALE = (1, 2)  # decoded-transformed summary: latent scaled by 1/2 and rotated a quarter turn
SUMMARY_ROT = 1


@cached_when_hashable(maxsize=8)  # the same jitted function for the same graphs: one trace per process
def make_eval_step(vae_graph: nnx.GraphDef, lpips_graph: nnx.GraphDef | None, seed: int):
    """jit((vae_params, lpips_state, images, mask) -> {metric: sum over valid images}, replicated).

    Reconstructions decode a posterior sample with a fixed key, as the reference's eval.py samples
    (`encode(x).sample()`); LPIPS runs without dropout. Sums are reduced on device, so multi-host runs need no
    gather.
    """

    @jax.jit
    def step(vae_params, lpips_state, images, mask):
        vae = nnx.merge(vae_graph, vae_params)
        posterior = vae.encode(images)
        recon = vae.decode(posterior.sample(jax.random.key(seed)))
        per_image = {"psnr": reconstruction.psnr(recon, images), "ssim": reconstruction.ssim(recon, images)}
        if lpips_graph is not None:
            per_image["lpips"] = nnx.merge(lpips_graph, lpips_state)(images, recon)
        errors = eq_eval.equivariance_errors(lambda a: vae.encode(a).mean, images)
        w = mask.astype(jnp.float32)
        sums = {k: jnp.sum(v * w) for k, v in per_image.items()}
        sums.update({f"equivariance/{k}": jnp.sum(v * w) for k, v in errors.items()})
        sums["images"] = jnp.sum(w)
        return sums

    return step


@cached_when_hashable(maxsize=8)  # the same jitted function for the same graphs: one trace per process
def make_vq_eval_step(vae_graph: nnx.GraphDef, lpips_graph: nnx.GraphDef | None, seed: int):
    """`make_eval_step` for a VQGAN: reconstructions decode the codebook vectors (deterministic, `seed` unused);
    the equivariance errors are on the pre-quantization features, with the code agreement under rotations
    (`eval.equivariance.vq_equivariance`); `code_counts` ((n_embed,), summed over the valid images) gives the
    codebook usage and perplexity of the held-out codes."""
    del seed

    @jax.jit
    def step(vae_params, lpips_state, images, mask):
        vq = nnx.merge(vae_graph, vae_params)
        encoding = vq.encode(images)
        recon = vq.decode(encoding.quantized)
        per_image = {"psnr": reconstruction.psnr(recon, images), "ssim": reconstruction.ssim(recon, images)}
        if lpips_graph is not None:
            per_image["lpips"] = nnx.merge(lpips_graph, lpips_state)(images, recon)
        w = mask.astype(jnp.float32)
        sums = {k: jnp.sum(v * w) for k, v in per_image.items()}
        sums.update({f"equivariance/{k}": jnp.sum(v * w) for k, v in eq_eval.vq_equivariance(vq, images).items()})
        sums["images"] = jnp.sum(w)
        sums["code_counts"] = vq_vae.code_counts(encoding.indices, vq.quantize.n_embed, mask)
        return sums

    return step


def evaluate(step, vae_params, lpips_state, batches, max_batches: int) -> dict[str, float]:
    """Mean of each metric over the valid (mask=True) held-out images of up to `max_batches` batches, with the
    equivariance error also per transform family (rotation, scale; for a VQGAN also the code agreement
    'codes/rotation') as in the paper, and the codebook usage and perplexity when the step counts codes."""
    totals: dict[str, np.ndarray] = {}
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            mask = batch.get("mask")
            if mask is None:
                mask = jnp.ones(batch["image"].shape[:1], bool)
            for k, v in jax.device_get(step(vae_params, lpips_state, batch["image"], mask)).items():
                v = np.asarray(v, np.int64 if np.ndim(v) else np.float64)
                totals[k] = totals[k] + v if k in totals else v
    finally:
        if hasattr(batches, "close"):
            batches.close()
    count = float(totals.pop("images", 0.0))
    counts = totals.pop("code_counts", None)
    if not count:
        return {}
    out = eq_eval.with_families({f"eval/{k}": float(v) / count for k, v in totals.items()},
                                prefix="eval/equivariance/")
    if counts is not None:
        out["eval/codebook_usage"] = float(vq_vae.codebook_usage(counts))
        out["eval/perplexity"] = float(vq_vae.perplexity(counts))
    out["eval/images"] = count
    return out


@cached_when_hashable(maxsize=8)  # the same jitted function for the same graphs: one trace per process
def make_summary_fn(vae_graph: nnx.GraphDef):
    """jit((vae_params, images) -> (reconstruction, decoded transformed latent, transformed input)), all in [0, 1]."""

    @jax.jit
    def fn(vae_params, images):
        vae = nnx.merge(vae_graph, vae_params)
        z = vae.encode(images).mode()
        recon = vae.decode(z)
        zt = resample.rot90(_half(z), SUMMARY_ROT)
        target = resample.rot90(_half(images), SUMMARY_ROT)
        to01 = lambda a: jnp.clip((a + 1.0) / 2.0, 0.0, 1.0)
        return to01(recon), to01(vae.decode(zt)), to01(target)

    return fn


@cached_when_hashable(maxsize=8)  # the same jitted function for the same graphs: one trace per process
def make_vq_summary_fn(vae_graph: nnx.GraphDef):
    """`make_summary_fn` for a VQGAN: the transformed pre-quantization features are quantized, then decoded."""

    @jax.jit
    def fn(vae_params, images):
        vq = nnx.merge(vae_graph, vae_params)
        encoding = vq.encode(images)
        recon = vq.decode(encoding.quantized)
        zt = resample.rot90(_half(encoding.latents), SUMMARY_ROT)
        target = resample.rot90(_half(images), SUMMARY_ROT)
        to01 = lambda a: jnp.clip((a + 1.0) / 2.0, 0.0, 1.0)
        return to01(recon), to01(vq.decode(vq.quantize(zt).quantized)), to01(target)

    return fn


def _half(x: jax.Array) -> jax.Array:
    return resample.resize(x, (SUMMARY_SCALE[0], SUMMARY_SCALE[0]), SUMMARY_SCALE[1])


def write_image_summaries(summary_fn, vae_params, config: Any, mesh: Any, writer: Any, update: int,
                          workdir: str) -> str | None:
    """Inputs / reconstructions / transformed inputs / decoded transformed latents of the first held-out batch,
    to TensorBoard and WORKDIR/reconstructions.png; returns the PNG's path (None without valid images)."""
    it = build_eval_iterator(config.data, mesh, config.eval_batch_size)
    try:
        batch = next(iter(it))
    finally:
        it.close()
    outputs = summary_fn(vae_params, batch["image"]) + (batch["image"], batch["mask"])
    recon, decoded_t, target_t, images, mask = (np.asarray(a) for a in process_allgather(outputs, tiled=True))
    keep = np.flatnonzero(mask)[: config.eval.images]  # padding of the last eval batch is not shown
    if keep.size == 0:
        return None
    images = np.clip((images + 1) / 2, 0, 1)
    grid = row_grid([images[keep], recon[keep], target_t[keep], decoded_t[keep]])
    writer.write_images(update, {"reconstructions": grid[None]})
    path = f"{workdir}/reconstructions.png"
    if jax.process_index() == 0:
        with storage.atomic_file(path, suffix=".png") as tmp:  # local or gs://: whole or absent
            Image.fromarray(grid).save(tmp, format="PNG")
    return path
