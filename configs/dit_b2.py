"""DiT-B/2 on a latent cache, the EQ-VAE downstream recipe.

DDPM, eps prediction, MSE + VB; sampling: 250-step DDPM.

    python -m eqvae_jax.main --config=configs/dit_b2.py --workdir=gs://.../dit_b2 \
        --config.latents.cache_dir=gs://.../latents/imagenet256

AdamW 1e-4, wd 0, global batch 256, EMA 0.9999, 10% label dropout, 400K steps, bf16 matmuls, FSDP over the
devices of a slice. `:tiny` is the CPU variant on the demo latent cache (configs/extract_latents.py:tiny).
"""

from eqvae_jax.train.dit_config import apply_tiny, defaults


def get_config(variant: str = ""):
    config = defaults()
    config.objective = "ddpm"
    config.model.size = "B"
    config.model.patch = 2
    if variant == "tiny":
        apply_tiny(config)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'tiny')")
    return config
