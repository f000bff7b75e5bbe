"""Helpers shared by the job tests: config files with their variants, a toy latent cache, tree comparison."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from eqvae_jax.data import latent_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SHAPE = (8, 8, 4)  # latent shape of the toy cache
TOY_IMAGE_SIZE = 64  # side of its crops (f8 latents)


@contextlib.contextmanager
def xla_optimized() -> Iterator[None]:
    """XLA's optimizations on inside the block. The suite compiles at -O0 (conftest.py), which pays where a test
    compiles many programs and runs each a few times; a test that runs one small program hundreds of times (a
    model trained until its loss falls) is faster with them. Programs it compiles are cached under other keys.
    XLA_FLAGS stay as they are (the suite's loop emitters, tests/cpu_devices.py): they are read once per process."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def jax_cache() -> str:
    """The test run's one persistent compilation cache (tests/conftest.py `shared_jax_cache`)."""
    return os.environ["EQVAE_TEST_JAX_CACHE"]


def load_config(name: str, arg: str = "", **changes: Any):
    """configs/NAME.py's get_config(arg) (as `--config=configs/NAME.py:arg` would), with dotted-key changes."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# The tiny EQ-VAE job for tests of storage, preemption or multi-process runs (not the branch mix or accumulation):
# every micro-step on the equivariance branch (one generator and one discriminator program to compile instead of
# five) and one micro-step per update (the tiny config accumulates 2, which test_eqvae_train.py covers; each
# micro-step of a multi-process CPU job costs seconds of cross-process collectives).
EQ_ONE_MICRO_STEP = {"transform.p_equivariance": 1.0, "optim.accumulate": 1}


def config_flags(changes: dict[str, Any]) -> list[str]:
    """The `--config.KEY=VALUE` flags that make a `python -m eqvae_jax.main` run apply `changes` (dotted keys)."""
    return [f"--config.{key}={value}" for key, value in changes.items()]


def tiny_eqvae_config(cache_dir: str, **changes: Any):
    """configs/sdvae_ft.py:tiny with the compilation cache and the demo TFDS data under `cache_dir`."""
    return load_config("sdvae_ft", "tiny", **{"compilation_cache_dir": cache_dir,
                                              "data.data_dir": os.path.join(cache_dir, "tfds"), **changes})


def tiny_dit_config(cache_dir: str, compile_cache: str = "", objective: str = "ddpm", **changes: Any):
    """configs/dit.py:tiny on the toy latent cache `cache_dir`."""
    return load_config("dit", f"objective={objective},tiny", compilation_cache_dir=compile_cache,
                       **{"latents.cache_dir": cache_dir}, **changes)


def tiny_repa_config(cache_dir: str, compile_cache: str = "", **changes: Any):
    """configs/dit.py:objective=sit,repa,tiny on the toy latent cache with images `cache_dir`."""
    return load_config("dit", "objective=sit,repa,tiny", compilation_cache_dir=compile_cache,
                       **{"latents.cache_dir": cache_dir}, **changes)


def toy_images(n: int = 16) -> np.ndarray:
    """The uint8 (n, 64, 64, 3) crops of `write_toy_cache(images=True)`: a per-record random smooth picture."""
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, TOY_IMAGE_SIZE // 8, axis=1), TOY_IMAGE_SIZE // 8, axis=2)


def write_toy_cache(cache_dir: str, n: int = 16, classes: int = 4, images: bool = False) -> None:
    """n records: class c has a fixed smooth pattern as mean and a small std (a learnable toy set); with `images`
    each record also stores a 64 px crop (`toy_images`), as a cache extracted with store_images."""
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((classes,) + TOY_SHAPE).astype(np.float32)
    crops = toy_images(n) if images else [None] * n
    records = []
    for i in range(n):
        c = i % classes
        moments = np.concatenate([patterns[c], np.full(TOY_SHAPE, 0.05, np.float32)], axis=-1)
        records.append(latent_cache.encode_record(i, c, False, moments, "float32", crops[i]))
    vae = {"init": "random", "preset": "tiny", "seed": 0, "dtype": "float32", "weights": "",
           "overrides": {"channel_mult": [1, 2, 2, 2], "base_channels": 16, "norm_num_groups": 8},
           "scaling_factor": 0.0, "shift_factor": None}
    extra = {"store_images": True, "image_size": TOY_IMAGE_SIZE} if images else {}
    latent_cache.write_meta(cache_dir, {"num_chunks": 1, "latent_shape": list(TOY_SHAPE), "dtype": "float32",
                                        "scaling_factor": 1.0, "shift_factor": 0.0, "vae": vae, **extra})
    latent_cache.write_chunk(latent_cache.chunk_path(cache_dir, 0, 1), records)


TOY_GRID = (16, 16)  # token grid of the toy token cache
TOY_CODES = 64  # its codebook size (the tiny VQ preset's)


def tiny_maskgit_config(cache_dir: str, compile_cache: str = "", **changes: Any):
    """configs/maskgit.py:tiny on the toy token cache `cache_dir`."""
    return load_config("maskgit", "tiny", compilation_cache_dir=compile_cache, **{"tokens.cache_dir": cache_dir},
                       **changes)


def toy_token_grids(classes: int = 4) -> np.ndarray:
    """The per-class token grids of `write_toy_token_cache`: smooth 4x4-block patterns of codes."""
    coarse = np.random.default_rng(0).integers(0, TOY_CODES, (classes, 4, 4))
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.int32)


def write_toy_token_cache(cache_dir: str, n: int = 16, classes: int = 4) -> None:
    """n images, class c's tokens a fixed grid (`toy_token_grids`), one record each (a learnable toy set), with
    the meta of a cache made by configs/extract_tokens.py:tiny (a random tiny VQ: 64 codes, 16x16 tokens)."""
    grids = toy_token_grids(classes)
    records = [latent_cache.encode_token_record(i, i % classes, False, 0, grids[i % classes]) for i in range(n)]
    vq = {"kind": "vq_vae", "init": "random", "preset": "tiny", "seed": 0, "dtype": "float32", "weights": "",
          "overrides": {}, "scaling_factor": 0.0, "shift_factor": None}
    latent_cache.write_meta(cache_dir, {"content": "tokens", "num_chunks": 1, "token_shape": list(TOY_GRID),
                                        "codebook_size": TOY_CODES, "dtype": "int16", "flip": "none", "crops": 1,
                                        "records_per_image": 1, "vae": vq, "image_size": 32})
    latent_cache.write_chunk(latent_cache.chunk_path(cache_dir, 0, 1), records)


def toy_patterns(classes: int = 4) -> np.ndarray:
    """The per-class means of `write_toy_cache`."""
    return np.random.default_rng(0).standard_normal((classes,) + TOY_SHAPE).astype(np.float32)


def leaves_equal(a: Any, b: Any) -> bool:
    """Same tree structure and bit-identical leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def tiny_eqvqgan_config(cache_dir: str, **changes: Any):
    """configs/vqgan_ft.py:tiny with the compilation cache and the demo TFDS data under `cache_dir`."""
    return load_config("vqgan_ft", "tiny", compilation_cache_dir=cache_dir,
                       **{"data.data_dir": os.path.join(cache_dir, "tfds")}, **changes)
