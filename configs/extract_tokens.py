"""Encode ImageNet once into a token cache for MaskGIT: the VQGAN's 16x16 code indices of several random crops
per image, in both orientations.

    python -m eqvae_jax.main --config=configs/extract_tokens.py --workdir=gs://.../tokens/imagenet256 \
        --config.vae.weights=weights/vqgan_imagenet_f16_1024

MaskGIT (valeoai/Maskgit-pytorch v1) encodes every batch on the fly after torchvision Resize(256) +
RandomCrop(256) + RandomHorizontalFlip, so each of its 300 epochs sees a new crop and flip. A cache freezes the
augmentation, and mirroring tokens is not encoding the mirrored image, so each image is stored as `crops` random
crops (`resize_random_crop`, crop c of image i from a generator seeded by (crop_seed, i, c)) in both orientations
(flip='copy'); the MaskGIT job's reader shows one of them per image and epoch. Storage: a record is 527 B (15 B
header + 256 int16 codes; measured 514-528 B per record in the chunk files), x crops x 2 records per image:
crops=4 is 8 records per image, 10.2M records and 5.4 GB for ImageNet's 1,281,167 training images (each further
crop adds 1.35 GB); extraction runs crops x 2 VQGAN encoder passes per image, once. With ImageNet's typical 4:3
aspect only the horizontal offset varies (0..85 px at 256), so a few crops span much of the range; 300 epochs
show each of the 8 variants ~37 times where v1 draws afresh (the deviation a cache makes; raise `crops` to
narrow it).

Variants: `crops=N` (default 4), `tiny` (the demo photographs at 32 px with a random tiny f2 VQ: 16x16 tokens of
a 64-code book, 2 crops x 2 flips, crops stored; CPU, seconds).
"""

from eqvae_jax.train.latents.config import defaults
from eqvae_jax.typed_config import parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, crops=4, tiny=False)
    c = defaults()
    c.trainer = "extract_tokens"
    c.vae.kind = "vq_vae"
    c.vae.weights = "weights/vqgan_imagenet_f16_1024"  # python -m eqvae_jax.convert --kind vq_vae
    c.vae.preset = "taming_f16_n1024"
    c.data.transform = "resize_random_crop"  # torchvision Resize(256) + RandomCrop(256), v1's training crop
    c.crops = a.crops
    c.flip = "copy"  # both orientations of every crop: v1's RandomHorizontalFlip, drawn by the reader
    if a.tiny:
        c.vae.init = "random"
        c.vae.preset = "tiny"  # f2, 64 codes: 32 px -> 16x16 tokens
        c.data.source = "demo"
        c.data.image_size = 32
        c.data.worker_count = 0
        c.crops = 2 if a.crops == 4 else a.crops
        c.batch_size_per_process = 8
        c.chunk_size = 8
        c.store_images = True  # the tests check each record against its crop
    return c
