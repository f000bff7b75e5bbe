"""Encode ImageNet once into a latent cache for DiT/SiT training (recipe.md §5.1, REPA-style mean + std).

    python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=gs://.../latents/imagenet256 \
        --config.vae.weights=weights/eq_vae

ADM center crop to 256, no flip (set `flip_copy=True` to also store each image's mirror image, doubling the
set), float32 mean/std per image. Rerunning the same command finishes an interrupted extraction. `:tiny`
encodes the demo photographs at 64 px with a random tiny VAE (CPU, seconds).
"""

from eqvae_jax.train.latent_config import defaults


def get_config(variant: str = ""):
    config = defaults()
    config.data.source = "tfds"
    config.data.image_size = 256
    if variant == "tiny":
        config.vae.init = "random"
        config.vae.preset = "tiny"
        config.vae.overrides = {"channel_mult": (1, 2, 2, 2), "base_channels": 16, "norm_num_groups": 8}
        config.data.source = "demo"
        config.data.image_size = 64
        config.data.worker_count = 0
        config.batch_size = 8
        config.chunk_size = 8
        config.flip_copy = True
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'tiny')")
    return config
