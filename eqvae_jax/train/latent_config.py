"""Defaults and validation of the latent-extraction job (`trainer = 'extract_latents'`), plus the VAE spec.

The job encodes a dataset once with a VAE (ADM center crop, optional flipped copy) into a latent cache
(`eqvae_jax.data.latent_cache`); `--workdir` is the cache directory. `validate()` runs before anything is
built, in the same style as the EQ-VAE job's config (unknown keys with suggestions, weights paths).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
from ml_collections import ConfigDict, config_dict

from eqvae_jax.data import config as data_config
from eqvae_jax.data.latent_cache import DTYPES
from eqvae_jax.train.eqvae_config import ConfigError, check_weights_dir, unknown_keys


def vae_defaults() -> ConfigDict:
    """Which VAE encodes (and later decodes) the latents: a converted weights dir, or a seeded random preset."""
    c = ConfigDict()
    c.init = "weights"  # 'weights' (python -m eqvae_jax.convert --kind kl_vae) or 'random' (tests, demo)
    c.weights = ""
    c.preset = "sd_vae"  # for init='random': a kl_vae preset name
    c.overrides = ConfigDict()  # for init='random': KLVAEConfig field overrides
    c.seed = 0  # for init='random'
    c.dtype = "float32"  # compute dtype of the encoder
    c.scaling_factor = 0.0  # 0 = the VAE config's (0.18215 for SD-VAE and EQ-VAE on SD-VAE)
    c.shift_factor = config_dict.placeholder(float)  # None = the VAE config's (0 for SD-VAE)
    return c


def defaults() -> ConfigDict:
    c = ConfigDict()
    c.trainer = "extract_latents"
    c.mesh = ConfigDict({"data": -1, "fsdp": 1})  # over this process's devices; hosts work independently
    c.vae = vae_defaults()
    c.data = data_config.get_config()
    c.data.transform = "adm_center_crop"  # the DiT/fast-DiT extraction crop (recipe.md §5.1)
    c.data.shuffle = False
    c.data.flip = False
    c.data.worker_count = 8
    c.split = "train"  # 'train' or 'eval' (the data config's train or held-out source)
    c.batch_size = 256  # images per encode call on this process (padded at the end of a chunk)
    c.chunk_size = 4096  # images per chunk file; the unit of resumption
    c.flip_copy = False  # also store the horizontally flipped image as a second record
    c.dtype = "float32"  # storage dtype of mean/std ('float16'/'bfloat16' halve the cache)
    c.compilation_cache_dir = ""  # '' = WORKDIR/jax_cache
    return c


def validate(config: ConfigDict) -> None:
    """Raise ConfigError listing every problem; touches no device."""
    from eqvae_jax.data.transforms import TRANSFORMS

    problems = unknown_keys(config.to_dict(), defaults().to_dict())  # plain dicts: nested keys too
    problems += vae_problems(config.vae)
    if config.split not in ("train", "eval"):
        problems.append(f"split must be 'train' or 'eval', not {config.split!r}")
    if config.batch_size < 1 or config.chunk_size < 1:
        problems.append("batch_size and chunk_size must be >= 1")
    elif config.chunk_size % config.batch_size:
        problems.append(f"chunk_size={config.chunk_size} must be a multiple of batch_size={config.batch_size}")
    if config.dtype not in DTYPES:
        problems.append(f"dtype must be one of {DTYPES}, not {config.dtype!r}")
    if config.data.transform not in TRANSFORMS:
        problems.append(f"data.transform must be one of {TRANSFORMS}, not {config.data.transform!r}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def vae_problems(vae: ConfigDict) -> list[str]:
    from eqvae_jax.models import kl_vae

    problems = []
    if vae.init == "weights":
        check_weights_dir(problems, "vae.weights", vae.weights, required=True)
    elif vae.init == "random":
        if vae.preset not in kl_vae.PRESETS:
            problems.append(f"vae.preset {vae.preset!r} is not one of {sorted(kl_vae.PRESETS)}")
    else:
        problems.append(f"vae.init must be 'weights' or 'random', not {vae.init!r}")
    return problems


def vae_spec(vae: ConfigDict) -> dict[str, Any]:
    """The VAE section as plain JSON (stored in the cache meta so sampling can rebuild the same VAE)."""
    return ConfigDict(vae).to_dict()


def load_vae(spec: dict[str, Any]):
    """The KLVAE described by a spec (`vae_spec`), with the spec's latent scale/shift overrides applied."""
    from eqvae_jax.models import kl_vae

    if spec["init"] == "weights":
        vae = kl_vae.load(spec["weights"], dtype=spec.get("dtype", "float32"))
        logging.info("VAE: loaded %s", spec["weights"])
    else:
        overrides = dict(spec.get("overrides") or {})
        overrides["dtype"] = spec.get("dtype", "float32")
        vae = kl_vae.build(kl_vae.PRESETS[spec["preset"]](**overrides), seed=int(spec.get("seed", 0)))
        logging.warning("VAE: random %s (seed %s); for tests and demos only", spec["preset"], spec.get("seed"))
    changes = {}
    if spec.get("scaling_factor", 0.0) > 0:
        changes["scaling_factor"] = float(spec["scaling_factor"])
    if spec.get("shift_factor") is not None:
        changes["shift_factor"] = float(spec["shift_factor"])
    if changes:
        vae.config = dataclasses.replace(vae.config, **changes)
    return vae
