"""Schema and checks of the cache-extraction job (`trainer = 'extract_latents'` or `'extract_tokens'`).

The job encodes a dataset once with an autoencoder into a cache (`eqvae_jax.data.latent_cache`); `--workdir` is
the cache directory. The autoencoder's family decides what is stored: a KL autoencoder's posterior moments
(`extract_latents`: ADM center crop and one random horizontal flip per image, the DiT/fast-DiT extraction; REPA's
cache, configs/extract_latents.py:images, stores the crops too and never flips) or a
VQ autoencoder's code indices (`extract_tokens`: MaskGIT's Resize + RandomCrop, `crops` crops per image in both
orientations). Each process encodes its own chunks on its own devices, so the batch size is per process.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.latent_cache import DTYPES, FLIPS
from eqvae_jax.data.transforms import RANDOM_TRANSFORMS
from eqvae_jax.models import vq_vae
from eqvae_jax.models.autoencoders import AutoencoderSpec
from eqvae_jax.train.config import MeshConfig
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect, positive

SPLITS = ("train", "eval")
CONTENT = {"extract_latents": "moments", "extract_tokens": "tokens"}  # trainer -> what the cache holds


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    trainer: str = "extract_latents"
    mesh: MeshConfig = MeshConfig()  # over this process's devices; hosts work independently
    vae: AutoencoderSpec = dataclasses.field(default_factory=AutoencoderSpec)
    data: DataConfig = DataConfig(transform="adm_center_crop", shuffle=False, flip=False)
    split: str = "train"  # the data section's training or held-out source
    batch_size_per_process: int = 256  # images per encode call on this process (padded at the end of a chunk)
    chunk_size: int = 4096  # images per chunk file; the unit of resumption
    # Horizontal flips (data.latent_cache.FLIPS): 'random' = one record per image, mirrored for about half of them
    # by a per-image coin seeded with flip_seed (the reference: fast-DiT's RandomHorizontalFlip once at
    # extraction); 'copy' = both orientations as two records; 'none' = as is (REPA's preprocessing, edm2's
    # center-crop-dhariwal, never flips: configs/extract_latents.py:images sets it).
    flip: str = "random"
    flip_seed: int = 0
    # Crops per image (token caches): a random transform (data.transform 'resize_random_crop', MaskGIT's) is drawn
    # `crops` times per image, crop c from a generator seeded by (crop_seed, index, c), so a restart or another
    # process count draws the same windows. Each crop is stored in the orientations `flip` asks for.
    crops: int = 1
    crop_seed: int = 0
    store_images: bool = False  # also store each uint8 crop as encoded (REPA's teacher input; 196,608 B at 256 px)
    dtype: str = "float32"  # storage dtype of mean/std ('float16'/'bfloat16' halve the cache); tokens are int16
    compilation_cache_dir: str = ""  # '' = WORKDIR/jax_cache

    @property
    def content(self) -> str:
        """'moments' (a latent cache) or 'tokens' (a token cache), from the trainer name."""
        return CONTENT.get(self.trainer, "moments")


def defaults() -> ConfigDict:
    return default_config(ExtractConfig)


def parse_config(config: ConfigDict) -> ExtractConfig:
    """The typed config, or a ConfigError listing every problem (touches no device)."""
    c, problems = parse_collect(ExtractConfig, config)
    problems += c.vae.problems("vae") + c.data.problems()
    if c.split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, not {c.split!r}")
    sizes = positive(("batch_size_per_process", c.batch_size_per_process), ("chunk_size", c.chunk_size))
    problems += sizes
    if not sizes and c.chunk_size % c.batch_size_per_process:
        problems.append(f"chunk_size={c.chunk_size} must be a multiple of batch_size_per_process="
                        f"{c.batch_size_per_process}")
    if c.trainer not in CONTENT:
        problems.append(f"trainer must be one of {sorted(CONTENT)}, not {c.trainer!r}")
    elif (c.content == "tokens") != (c.vae.kind == vq_vae.KIND):
        want = "a VQ autoencoder (vae.kind='vq_vae')" if c.content == "tokens" else "a KL one (vae.kind='kl_vae')"
        problems.append(f"trainer {c.trainer!r} stores {c.content} and needs {want}, not vae.kind={c.vae.kind!r}")
    if c.crops < 1:
        problems.append(f"crops must be positive, got {c.crops}")
    elif c.crops > 1:
        if c.content != "tokens":
            problems.append(f"crops={c.crops}: several crops per image are for token caches (MaskGIT's random crops); "
                            "a latent cache stores one per image")
        if c.data.transform not in RANDOM_TRANSFORMS:
            problems.append(f"crops={c.crops} would store identical copies: data.transform={c.data.transform!r} is "
                            f"deterministic (use one of {RANDOM_TRANSFORMS})")
    if c.flip not in FLIPS:
        problems.append(f"flip must be one of {FLIPS}, not {c.flip!r}")
    if c.dtype not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}, not {c.dtype!r}")
    if problems:
        raise ConfigError(problems)
    return c
