"""Periodic evaluation of the autoencoder on held-out images: PSNR, SSIM, LPIPS and the equivariance error,
plus image summaries (inputs, reconstructions, decoded transformed latents)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.eval import equivariance as eq_eval
from eqvae_jax.eval import reconstruction
from eqvae_jax.losses import resample

SUMMARY_SCALE = (1, 2)  # decoded-transformed summary: latent scaled by 1/2 and rotated a quarter turn
SUMMARY_ROT = 1


def make_eval_step(vae_graph: nnx.GraphDef, lpips_graph: nnx.GraphDef | None, seed: int):
    """jit((vae_params, lpips_state, images, mask) -> {metric: sum over valid images}, replicated).

    Reconstructions decode a posterior sample with a fixed key, as the reference's eval.py samples (recipe.md
    §6.1); LPIPS runs without dropout. Sums are reduced on device, so multi-host runs need no gather.
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


def evaluate(step, vae_params, lpips_state, batches, max_batches: int) -> dict[str, float]:
    """Mean of each metric over the valid (mask=True) held-out images of up to `max_batches` batches, with the
    equivariance error also per transform family (rotation, scale) as in the paper."""
    totals: dict[str, float] = {}
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            mask = batch.get("mask")
            if mask is None:
                mask = jnp.ones(batch["image"].shape[:1], bool)
            for k, v in jax.device_get(step(vae_params, lpips_state, batch["image"], mask)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    count = totals.pop("images", 0.0)
    if not count:
        return {}
    out = {f"eval/{k}": v / count for k, v in totals.items()}
    for family, names in _families().items():
        out[f"eval/equivariance/{family}"] = float(np.mean([out[f"eval/equivariance/{n}"] for n in names]))
    out["eval/images"] = count
    return out


def _families() -> dict[str, list[str]]:
    families: dict[str, list[str]] = {}
    for name, (family, _) in eq_eval.EquivarianceEvalConfig().transforms().items():
        families.setdefault(family, []).append(name)
    return families


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


def _half(x: jax.Array) -> jax.Array:
    return resample.resize(x, (SUMMARY_SCALE[0], SUMMARY_SCALE[0]), SUMMARY_SCALE[1])


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of NHWC [0, 1] images (each row may have its own size) into one uint8 HWC grid."""
    height = max(r.shape[1] for r in rows)
    width = max(r.shape[0] * (r.shape[2] + pad) for r in rows)
    grid = np.ones((len(rows) * (height + pad), width, 3), np.float32)
    for i, row in enumerate(rows):
        y = i * (height + pad)
        for j, img in enumerate(row):
            x = j * (img.shape[1] + pad)
            grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return (grid * 255.0 + 0.5).astype(np.uint8)
