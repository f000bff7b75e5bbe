"""What the chain measures on each VQ arm beyond eval_vae, on the held-out shapes images eval_vae scores: codebook
usage (fraction of codes used at least once) and perplexity of their code indices, and the high-frequency energy
of their pre-quantization features (the features EQ-VQGAN transforms; eval/spectrum.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqvae_jax.eval.shapes_metric import render_set
from eqvae_jax.eval.spectrum import high_frequency_fraction
from eqvae_jax.models import vq_vae


def encode(vq: vq_vae.VQVAE, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pre-quantization features (N, h, w, C), code indices (N, h, w)) of uint8 images."""
    graphdef, state = nnx.split(vq)

    def fn(s: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = nnx.merge(graphdef, s).encode(x.astype(jnp.float32) / 127.5 - 1.0)
        return out.latents, out.indices

    step = jax.jit(fn)
    parts = [step(state, jnp.asarray(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate([np.asarray(z) for z, _ in parts]), np.concatenate([np.asarray(k) for _, k in parts])


def analyse(weights: dict[str, str], image_size: int, shapes_seed: int, count: int, batch_size: int,
            cutoff: float) -> dict[str, dict[str, float]]:
    """{arm: {codebook_usage, codebook_perplexity, codebook_size, hf_energy, hf_cutoff}} for the arms' weights."""
    images, _ = render_set(shapes_seed, "validation", count, image_size)
    results = {}
    for arm, path in weights.items():
        vq = vq_vae.load(path)
        z, codes = encode(vq, images, batch_size)
        counts = np.bincount(codes.ravel(), minlength=vq.config.n_embed)
        results[arm] = {"codebook_usage": float(vq_vae.codebook_usage(jnp.asarray(counts))),
                        "codebook_perplexity": float(vq_vae.perplexity(jnp.asarray(counts))),
                        "codebook_size": int(vq.config.n_embed),
                        "hf_energy": high_frequency_fraction(z, cutoff), "hf_cutoff": cutoff}
    return results
