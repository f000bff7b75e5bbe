"""Encode ImageNet once into a latent cache for DiT/SiT training (REPA-style posterior mean + std per image).

    python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=gs://.../latents/imagenet256 \
        --config.vae.weights=weights/eq_vae

The recipe is the schema's defaults (eqvae_jax/train/latents/config.py `ExtractConfig`): ImageNet (TFDS
imagenet2012), ADM center crop to 256 and one horizontal flip drawn per image (fast-DiT's extract_features.py applies
RandomHorizontalFlip once at extraction, so about half the stored latents are mirrored), float32 mean/std per
image. Rerunning the same command finishes an interrupted extraction. `:images` is the cache SiT + REPA reads:
it also stores each uint8 crop as encoded (the DINOv2 teacher's input, as REPA's own data preparation keeps the
center-cropped images; 196,608 B per image, 252 GB for ImageNet's 1.28M) and, like REPA's preprocessing (edm2
`dataset_tool.py --transform=center-crop-dhariwal`, read as is by REPA's `dataset.py`), never flips
(`flip='none'`). `:tiny` encodes the demo photographs at 64 px with a random tiny VAE and stores the crops
(CPU, seconds; one random flip per image like the default; `:images,tiny` is the unflipped REPA cache).
"""

from eqvae_jax.train.latents.config import defaults
from eqvae_jax.typed_config import parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, images=False, tiny=False)
    c = defaults()
    c.vae.weights = "weights/eq_vae"
    if a.images:  # REPA's cache: the crops too, never mirrored (REPA's preprocessing has no flip)
        c.store_images = True
        c.flip = "none"
    if a.tiny:
        c.vae.init = "random"
        c.vae.preset = "tiny"
        c.vae.overrides = {"channel_mult": (1, 2, 2, 2), "base_channels": 16, "norm_num_groups": 8}
        c.data.source = "demo"
        c.data.image_size = 64
        c.data.worker_count = 0
        c.batch_size_per_process = 8
        c.chunk_size = 8
        c.store_images = True  # the tiny SiT + REPA variant reads them
    return c
