"""Cache extraction job: encode a dataset once into a latent cache (a KL autoencoder's posterior mean and std +
label per image) or a token cache (a VQ autoencoder's code indices + label per crop and orientation), with
`store_images` also the uint8 crop as encoded.

    python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=CACHE_DIR \
        --config.vae.weights=weights/eq_vae
    python -m eqvae_jax.main --config=configs/extract_tokens.py --workdir=CACHE_DIR \
        --config.vae.weights=weights/vqgan_imagenet_f16_1024

Each process encodes the chunks k with k % process_count == process_index on its own devices (no
cross-host collectives, so hosts never wait for each other) and writes each chunk atomically; rerunning
the same command skips finished chunks. Images are decoded and cropped (`crops` windows per image, each from its
own seeded generator) in Grain threads; encoding is dispatched asynchronously one batch ahead of the host-side
record writing. An image's records are consecutive: crop 0 [as is, mirrored], crop 1 ...
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
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from eqvae_jax import storage
from eqvae_jax.data import latent_cache
from eqvae_jax.data.decode import SkipImage, decode_image
from eqvae_jax.data.sources import open_source
from eqvae_jax.data.transforms import Crop
from eqvae_jax.models import vq_vae
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.coordination import make_once
from eqvae_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from eqvae_jax.train.latents.config import ExtractConfig, parse_config
from eqvae_jax.train.run_dir import enable_compilation_cache

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


class _DecodeCrops(grain.transforms.Map):
    """Record -> {'image' (crops, S, S, 3) uint8, 'label', 'index', 'mask'}: crop c of image i drawn with
    `latent_cache.crop_rng(seed, i, c)`. Padding and undecodable images become zeros with mask False."""

    def __init__(self, crop: Crop, min_side: int, crops: int, seed: int) -> None:
        self.crop, self.min_side, self.crops, self.seed = crop, min_side, crops, seed

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        index = int(record["index"])
        out = {"index": np.int64(index), "label": np.int32(record.get("label", -1)), "mask": np.bool_(False),
               "image": np.zeros((self.crops, self.crop.size, self.crop.size, 3), np.uint8)}
        if record["pad"]:
            return out
        try:
            if record["unreadable"]:
                raise SkipImage("unreadable", "could not read the file")
            image = decode_image(record["bytes"], self.min_side)
            crops = [self.crop(image, latent_cache.crop_rng(self.seed, index, c)) for c in range(self.crops)]
        except SkipImage as e:
            log.warning("extract: skipping %s (%s)", record.get("name", index), e)
            return out
        return out | {"image": np.stack(crops), "mask": np.bool_(True)}


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


def _meta(config: ExtractConfig, num_images: int, shape: tuple[int, ...], vae: Any) -> dict[str, Any]:
    d = config.data
    meta = {
        "content": config.content,
        "vae": dataclasses.asdict(config.vae),
        "num_images": num_images,
        "chunk_size": config.chunk_size,
        "num_chunks": -(-num_images // config.chunk_size),
        "flip": config.flip,
        "flip_seed": config.flip_seed,
        "crops": config.crops,
        "crop_seed": config.crop_seed,
        "records_per_image": config.crops * (2 if config.flip == "copy" else 1),
        "store_images": bool(config.store_images),
        "image_size": d.image_size,
        "transform": d.transform,
        "source": {"source": d.source, "tfds_name": d.tfds_name, "folder": d.folder, "split": config.split,
                   **({"shapes_seed": d.shapes_seed, "shapes_size": d.shapes_size or d.image_size}
                      if d.source == "shapes" else {})},
    }
    if config.content == "tokens":
        return meta | {"token_shape": list(shape), "codebook_size": int(vae.config.n_embed),
                       "dtype": latent_cache.TOKEN_DTYPE}
    return meta | {"latent_shape": list(shape), "dtype": config.dtype,
                   "scaling_factor": float(vae.config.scaling_factor), "shift_factor": float(vae.config.shift_factor)}


_MUST_MATCH = {
    "moments": ("content", "vae", "latent_shape", "dtype", "num_images", "chunk_size", "flip", "flip_seed", "crops",
                "crop_seed", "image_size", "transform", "source", "scaling_factor", "shift_factor", "store_images"),
    "tokens": ("content", "vae", "token_shape", "codebook_size", "num_images", "chunk_size", "flip", "flip_seed",
               "crops", "crop_seed", "image_size", "transform", "source", "store_images"),
}
# keys that caches written before them lack
_META_DEFAULTS = {"store_images": False, "content": "moments", "crops": 1, "crop_seed": 0}


def _check_or_write_meta(cache_dir: str, meta: dict[str, Any]) -> None:
    """Write meta.json, or check that the one there describes this extraction. Process 0 first, then the others
    (which then check process 0's file, or write their own on a host-local cache dir)."""
    meta = json.loads(json.dumps(meta))  # compare in JSON form (tuples become lists)

    def check_or_write() -> None:
        if epath.Path(cache_dir, latent_cache.META_FILE).is_file():
            old = latent_cache.read_meta(cache_dir)
            diff = [k for k in _MUST_MATCH[meta["content"]] if old.get(k, _META_DEFAULTS.get(k)) != meta[k]]
            if diff:
                raise ValueError(f"{cache_dir!r} holds a cache made differently ({diff} differ); "
                                 "use a new --workdir or delete the old cache")
        else:
            latent_cache.write_meta(cache_dir, meta)

    make_once("the cache metadata", check_or_write)


def encoded_crop(image: np.ndarray, flipped: bool) -> np.ndarray:
    """The uint8 (S, S, 3) crop exactly as the encoder saw it: mirrored left-right for a flipped record."""
    return image[:, ::-1] if flipped else image


def make_encoder(vae: nnx.Module, flip: str, sharding: NamedSharding, content: str = "moments"):
    """jitted (uint8 crops (B, C, S, S, 3), flips (B, C)) -> (B, C, V, ...) per crop and orientation: V = 2 for
    flip='copy' (as is, then mirrored), else 1 (mirrored where `flips` with flip='random'). Per row [mean | std]
    (h, w, 2c) float32 for content 'moments', (h, w) int32 code indices for 'tokens'."""
    graphdef, state = nnx.split(vae)

    def encode(state: nnx.State, images: jax.Array, flips: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        x = (images.astype(jnp.float32) - 127.5) / 127.5
        mirrored = x[:, :, :, ::-1]  # (B, C, H, W, 3): left-right
        if flip == "random":
            x = jnp.where(flips[:, :, None, None, None], mirrored, x)[:, :, None]
        elif flip == "copy":
            x = jnp.stack([x, mirrored], axis=2)
        else:
            x = x[:, :, None]
        b, c, v = x.shape[:3]
        out = model.encode(x.reshape((b * c * v,) + x.shape[3:]))
        out = out.indices if content == "tokens" else jnp.concatenate([out.mean, out.std], axis=-1)
        return out.reshape((b, c, v) + out.shape[1:])

    rep = replicated(sharding.mesh)
    state = jax.device_put(state, rep)
    fn = jax.jit(encode, in_shardings=(rep, sharding, sharding), out_shardings=sharding)
    return lambda images, flips: fn(state, images, flips)


def _output_shape(vae: nnx.Module, size: int, content: str) -> tuple[int, ...]:
    """(h, w) of the code indices or (h, w, c) of the latents of one size x size image."""
    out = jax.eval_shape(lambda: vae.encode(jnp.zeros((1, size, size, 3))))
    return tuple(out.indices.shape[1:] if content == "tokens" else out.mean.shape[1:])


def run(config: ConfigDict | ExtractConfig, workdir: str) -> dict[str, float]:
    """Encode this process's unfinished chunks; returns counts and the throughput of this process."""
    config = config if isinstance(config, ExtractConfig) else parse_config(config)
    cache_dir = storage.resolve(workdir)  # local or gs://
    epath.Path(cache_dir, latent_cache.CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(config.compilation_cache_dir or os.path.join(cache_dir, "jax_cache"))

    source = open_source(config.data, train=config.split == "train")
    vae = build_autoencoder(config.vae)
    size = config.data.image_size
    if config.content == "tokens" and not isinstance(vae, vq_vae.VQVAE):
        raise ValueError(f"a token cache needs a VQ autoencoder, got {type(vae).__name__}")
    if config.content == "tokens" and vae.config.n_embed > np.iinfo(np.int16).max + 1:
        raise ValueError(f"a codebook of {vae.config.n_embed} codes does not fit the cache's int16 code indices")
    meta = _meta(config, len(source), _output_shape(vae, size, config.content), vae)
    _check_or_write_meta(cache_dir, meta)

    k = meta["num_chunks"]
    done = {i for i in range(k) if epath.Path(latent_cache.chunk_path(cache_dir, i, k)).is_file()}
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
    encode = make_encoder(vae, config.flip, sharding, config.content)
    crops, views = config.crops, 2 if config.flip == "copy" else 1

    indices = np.concatenate([idx for _, idx in plan])
    ds = grain.MapDataset.source(_ChunkRecords(source, indices))
    crop = Crop(config.data.transform, size, min_fraction=config.data.crop_min_fraction,
                max_fraction=config.data.crop_max_fraction)
    ds = ds.map(_DecodeCrops(crop, config.data.min_side, crops, config.crop_seed))
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

    def record(i: int, c: int, flipped: bool, value: np.ndarray, host: dict[str, np.ndarray]) -> bytes:
        index, label = host["index"][i], host["label"][i]
        image = encoded_crop(host["image"][i, c], flipped) if config.store_images else None
        if config.content == "tokens":
            return latent_cache.encode_token_record(index, label, flipped, c, value, image)
        return latent_cache.encode_record(index, label, flipped, value, config.dtype, image)

    def finish_one() -> None:
        chunk, host, flips, encoded = inflight.popleft()
        encoded = np.asarray(encoded)  # (B, crops, views, ...)
        for i in np.flatnonzero(host["mask"]):
            for c in range(crops):
                for v in range(views):
                    flipped = bool(v) if config.flip == "copy" else bool(flips[i, c])
                    records[chunk].append(record(i, c, flipped, encoded[i, c, v], host))
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
        flips = (latent_cache.flip_draws(config.flip_seed, host["index"][:, None], np.arange(crops)[None])
                 if config.flip == "random" else np.zeros((len(host["index"]), crops), bool))
        inflight.append((chunk, host, flips, encode(images, jax.device_put(flips, sharding))))
        if len(inflight) > 1:
            finish_one()
    while inflight:
        finish_one()
    stats["seconds"] = time.perf_counter() - start
    stats["records"] = stats["images"] * crops * views
    stats["images_per_s"] = stats["images"] / max(stats["seconds"], 1e-9)
    log.info("extract: process %d done: %s", jax.process_index(), stats)
    return stats
