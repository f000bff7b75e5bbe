"""Schema and checks of the latent-extraction job (`trainer = 'extract_latents'`).

The job encodes a dataset once with an autoencoder (ADM center crop and one random horizontal flip per image, the
DiT/fast-DiT extraction) into a latent cache (`eqvae_jax.data.latent_cache`); `--workdir` is the cache directory.
Each process encodes its own chunks on its own devices, so the batch size is per process.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.latent_cache import DTYPES, FLIPS
from eqvae_jax.models.autoencoders import AutoencoderSpec
from eqvae_jax.train.config import MeshConfig
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect

SPLITS = ("train", "eval")


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
    # by a per-image coin seeded with flip_seed (the reference: RandomHorizontalFlip once at extraction); 'copy' =
    # both orientations as two records; 'none' = as is.
    flip: str = "random"
    flip_seed: int = 0
    store_images: bool = False  # also store each uint8 crop as encoded (REPA's teacher input; 196,608 B at 256 px)
    dtype: str = "float32"  # storage dtype of mean/std ('float16'/'bfloat16' halve the cache)
    compilation_cache_dir: str = ""  # '' = WORKDIR/jax_cache


def defaults() -> ConfigDict:
    return default_config(ExtractConfig)


def parse_config(config: ConfigDict) -> ExtractConfig:
    """The typed config, or a ConfigError listing every problem (touches no device)."""
    c, problems = parse_collect(ExtractConfig, config)
    problems += c.vae.problems("vae") + c.data.problems()
    if c.split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, not {c.split!r}")
    if c.batch_size_per_process < 1 or c.chunk_size < 1:
        problems.append("batch_size_per_process and chunk_size must be >= 1")
    elif c.chunk_size % c.batch_size_per_process:
        problems.append(f"chunk_size={c.chunk_size} must be a multiple of batch_size_per_process="
                        f"{c.batch_size_per_process}")
    if c.flip not in FLIPS:
        problems.append(f"flip must be one of {FLIPS}, not {c.flip!r}")
    if c.dtype not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}, not {c.dtype!r}")
    if problems:
        raise ConfigError(problems)
    return c
