"""Latent extraction job: encode a dataset once into a latent cache (posterior mean and std + label per image,
and with `store_images` the uint8 crop as encoded).

    python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=CACHE_DIR \
        --config.vae.weights=weights/eq_vae

Each process encodes the chunks k with k % process_count == process_index on its own devices (no
cross-host collectives, so hosts never wait for each other) and writes each chunk atomically; rerunning
the same command skips finished chunks. Images are decoded and cropped in Grain workers; encoding is
dispatched asynchronously one batch ahead of the host-side record writing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from eqvae_jax.data import latent_cache, pipeline
from eqvae_jax.data.sources import open_source
from eqvae_jax.data.transforms import Crop
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from eqvae_jax.train.latents.config import ExtractConfig, parse_config
from eqvae_jax.train.services import enable_compilation_cache

log = logging.getLogger(__name__)


class _ChunkRecords:
    """Source records for a list of indices; index -1 is a padding record (masked out)."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        if index < 0:
            return {"index": index, "pad": True}
        return dict(self.source[index]) | {"index": index, "pad": False}


class _Blank(grain.transforms.Map):
    """Skipped images (image None, mask False) become zeros so batches keep their shape."""

    def __init__(self, size: int) -> None:
        self.size = size

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if element["image"] is None:
            element["image"] = np.zeros((self.size, self.size, 3), np.uint8)
        element.pop("skip")
        return element


def chunk_plan(num_images: int, chunk_size: int, batch_size: int, process: int, count: int,
               done: set[int]) -> list[tuple[int, np.ndarray]]:
    """(chunk, indices padded with -1 to a multiple of batch_size) for this process's unfinished chunks."""
    num_chunks = -(-num_images // chunk_size)
    plan = []
    for k in range(process, num_chunks, count):
        if k in done:
            continue
        idx = np.arange(k * chunk_size, min((k + 1) * chunk_size, num_images), dtype=np.int64)
        pad = -len(idx) % batch_size
        plan.append((k, np.concatenate([idx, np.full(pad, -1, np.int64)])))
    return plan


def _meta(config: ExtractConfig, num_images: int, latent_shape: tuple[int, ...], vae: Any) -> dict[str, Any]:
    d = config.data
    return {
        "vae": dataclasses.asdict(config.vae),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.shift_factor),
        "latent_shape": list(latent_shape),
        "dtype": config.dtype,
        "num_images": num_images,
        "chunk_size": config.chunk_size,
        "num_chunks": -(-num_images // config.chunk_size),
        "flip": config.flip,
        "flip_seed": config.flip_seed,
        "store_images": bool(config.store_images),
        "image_size": d.image_size,
        "transform": d.transform,
        "source": {"source": d.source, "tfds_name": d.tfds_name, "folder": d.folder, "split": config.split},
    }


_MUST_MATCH = ("vae", "latent_shape", "dtype", "num_images", "chunk_size", "flip", "flip_seed", "image_size",
               "transform", "source", "scaling_factor", "shift_factor", "store_images")
_META_DEFAULTS = {"store_images": False}  # keys that caches written before them lack


def _check_or_write_meta(cache_dir: str, meta: dict[str, Any]) -> None:
    meta = json.loads(json.dumps(meta))  # compare in JSON form (tuples become lists)
    if os.path.isfile(os.path.join(cache_dir, latent_cache.META_FILE)):
        old = latent_cache.read_meta(cache_dir)
        diff = [k for k in _MUST_MATCH if old.get(k, _META_DEFAULTS.get(k)) != meta[k]]
        if diff:
            raise ValueError(f"{cache_dir!r} holds a latent cache made differently ({diff} differ); "
                             "use a new --workdir or delete the old cache")
    elif jax.process_index() == 0:
        latent_cache.write_meta(cache_dir, meta)


def encoded_crop(image: np.ndarray, flipped: bool) -> np.ndarray:
    """The uint8 (S, S, 3) crop exactly as the encoder saw it: mirrored left-right for a flipped record."""
    return image[:, ::-1] if flipped else image


def make_encoder(vae: nnx.Module, flip: str, sharding: NamedSharding):
    """jitted (uint8 images, flips) -> [mean | std] (B, h, w, 2c) float32: of each image mirrored where `flips`
    (flip='random'), of the images then of their mirror images (2B rows, flip='copy'), or as they are."""
    graphdef, state = nnx.split(vae)

    def encode(state: nnx.State, images: jax.Array, flips: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        x = (images.astype(jnp.float32) - 127.5) / 127.5
        if flip == "random":
            x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
        elif flip == "copy":
            x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
        post = model.encode(x)
        return jnp.concatenate([post.mean, post.std], axis=-1)

    rep = replicated(sharding.mesh)
    state = jax.device_put(state, rep)
    fn = jax.jit(encode, in_shardings=(rep, sharding, sharding), out_shardings=sharding)
    return lambda images, flips: fn(state, images, flips)


def run(config: ConfigDict | ExtractConfig, workdir: str) -> dict[str, float]:
    """Encode this process's unfinished chunks; returns counts and the throughput of this process."""
    config = config if isinstance(config, ExtractConfig) else parse_config(config)
    cache_dir = os.path.abspath(workdir)
    os.makedirs(os.path.join(cache_dir, latent_cache.CHUNKS_DIR), exist_ok=True)
    enable_compilation_cache(config.compilation_cache_dir or os.path.join(cache_dir, "jax_cache"))

    source = open_source(config.data, train=config.split == "train")
    vae = build_autoencoder(config.vae)
    size = config.data.image_size
    latent_shape = jax.eval_shape(lambda: vae.encode(jnp.zeros((1, size, size, 3)))).mean.shape[1:]
    meta = _meta(config, len(source), latent_shape, vae)
    _check_or_write_meta(cache_dir, meta)

    k = meta["num_chunks"]
    done = {i for i in range(k) if os.path.isfile(latent_cache.chunk_path(cache_dir, i, k))}
    plan = chunk_plan(len(source), config.chunk_size, config.batch_size_per_process, jax.process_index(),
                      jax.process_count(), done)
    log.info("extract: %d images in %d chunks; %d done, %d to encode on process %d", len(source), k,
                 len(done), len(plan), jax.process_index())
    stats = {"chunks_written": 0, "chunks_skipped": len(done), "images": 0, "records": 0, "skipped": 0,
             "seconds": 0.0, "images_per_s": 0.0}
    if not plan:
        return stats

    devices = jax.local_devices()
    if config.mesh.data > 0 and config.mesh.fsdp > 0:  # an explicit mesh may use fewer devices
        devices = devices[: config.mesh.data * config.mesh.fsdp]
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    sharding = batch_sharding(mesh)
    if config.batch_size_per_process % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size={config.batch_size_per_process} is not divisible by the {len(devices)} devices")
    encode = make_encoder(vae, config.flip, sharding)

    indices = np.concatenate([idx for _, idx in plan])
    ds = grain.MapDataset.source(_ChunkRecords(source, indices))
    ds = ds.random_map(pipeline.DecodeCrop(Crop(config.data.transform, size), config.data.min_side),
                       seed=config.data.seed + 1)
    ds = ds.map(_Blank(size))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.data.read_threads),
                                              prefetch_buffer_size=config.data.read_buffer_size))
    it = it.batch(config.batch_size_per_process, drop_remainder=False)
    if config.data.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))

    owners = [chunk for chunk, idx in plan for _ in range(len(idx) // config.batch_size_per_process)]
    remaining = collections.Counter(owners)
    records: dict[int, list[bytes]] = collections.defaultdict(list)
    inflight: collections.deque = collections.deque()
    start = time.perf_counter()

    def finish_one() -> None:
        chunk, host, flips, moments = inflight.popleft()
        moments = np.asarray(moments)
        b = len(host["index"])
        image = lambda i, flipped: encoded_crop(host["image"][i], flipped) if config.store_images else None
        for i in range(b):
            if host["mask"][i]:
                records[chunk].append(latent_cache.encode_record(
                    host["index"][i], host["label"][i], flips[i], moments[i], config.dtype, image(i, flips[i])))
                if config.flip == "copy":
                    records[chunk].append(latent_cache.encode_record(
                        host["index"][i], host["label"][i], True, moments[b + i], config.dtype, image(i, True)))
        stats["images"] += int(host["mask"].sum())
        stats["skipped"] += int((~host["mask"] & (host["index"] >= 0)).sum())  # bad images, not padding
        remaining[chunk] -= 1
        if remaining[chunk] == 0:
            latent_cache.write_chunk(latent_cache.chunk_path(cache_dir, chunk, k), records.pop(chunk))
            stats["chunks_written"] += 1
            elapsed = time.perf_counter() - start
            log.info("extract: chunk %d/%d written; %d images in %.1f s (%.1f img/s)", chunk + 1, k,
                         stats["images"], elapsed, stats["images"] / elapsed)

    for chunk, host in zip(owners, it, strict=False):
        images = jax.device_put(host["image"], sharding)  # this process's devices only
        flips = (latent_cache.flip_draws(config.flip_seed, host["index"]) if config.flip == "random"
                 else np.zeros(len(host["index"]), bool))
        inflight.append((chunk, host, flips, encode(images, jax.device_put(flips, sharding))))
        if len(inflight) > 1:
            finish_one()
    while inflight:
        finish_one()
    stats["seconds"] = time.perf_counter() - start
    stats["records"] = stats["images"] * (2 if config.flip == "copy" else 1)
    stats["images_per_s"] = stats["images"] / max(stats["seconds"], 1e-9)
    log.info("extract: process %d done: %s", jax.process_index(), stats)
    return stats
