"""The latent cache: VAE posterior mean and std per image (+ label) in ArrayRecord chunk files, and its reader.

Layout of a cache directory (written by the `extract_latents` job, eqvae_jax/train/latents):

    CACHE/meta.json                     what was encoded how (VAE, crop, flip mode and seed, latent shape, scale,
                                        images)
    CACHE/chunks/chunk-00007-of-00040.array_record

The source images are split into fixed chunks of `chunk_size` consecutive indices; chunk k is encoded by
process k % process_count and written to a temporary name, then renamed, so a chunk file exists only when it
is complete. A restarted extraction skips chunks whose file exists (whatever the process count).

A record is `<q index><i label><B flipped>` followed by the (h, w, 2c) array [mean | std] in the cache dtype
and, in a cache extracted with `store_images` (meta `store_images: true`), by the uint8 (S, S, 3) crop the latent
was encoded from, exactly as encoded (mirrored in a flipped record): REPA's teacher input. Caches without the
meta key have no images and read as before. At 256 px a crop is 196,608 bytes, six times a float32 latent.
Flips (`flip` of the extraction): 'random' stores one record per image, horizontally mirrored when
`flip_draws(flip_seed, index)` says so (about half: the reference's extraction applies RandomHorizontalFlip once
per image); 'copy' stores both orientations; 'none' only the image as is.
Training draws z = mean + std * eps every step (REPA/edm2 style) and maps it with the VAE's latent scale:
(z - shift_factor) * scaling_factor (0.18215 for SD-VAE-based EQ-VAE).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from eqvae_jax.data import pipeline
from eqvae_jax.data.iterator import InputIterator, batch_sharding
from eqvae_jax.parallel.mesh import local_rows

FORMAT = "eqvae-jax-latents"
VERSION = 1
META_FILE = "meta.json"
CHUNKS_DIR = "chunks"
HEADER = struct.Struct("<qiB")  # source index, label, flipped
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LatentReadConfig:
    """How a training job reads a latent cache (the fields of its `latents` config section)."""

    cache_dir: str = ""
    shuffle: bool = True  # seeded global shuffle, reshuffled every epoch
    seed: int = 0
    read_threads: int = 4
    worker_count: int = 0  # decoding a record is a memcpy: threads are enough
    prefetch: int = 2  # global batches already transferred to the devices


FLIPS = ("random", "copy", "none")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def flip_draws(seed: int, indices: np.ndarray) -> np.ndarray:
    """bool per source index: is the image stored mirrored (flip='random')? A fair coin per image from a hash
    (SplitMix64) of (seed, index), so the same whatever the batching, chunking and process count."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed], np.int64).astype(np.uint64))
        bits = _splitmix64(key + np.asarray(indices, np.int64).astype(np.uint64))
    return (bits >> np.uint64(63)).astype(bool)


def chunk_name(chunk: int, num_chunks: int) -> str:
    return f"chunk-{chunk:05d}-of-{num_chunks:05d}.array_record"


def chunk_path(cache_dir: str, chunk: int, num_chunks: int) -> str:
    return os.path.join(cache_dir, CHUNKS_DIR, chunk_name(chunk, num_chunks))


def encode_record(index: int, label: int, flipped: bool, moments: np.ndarray, dtype: str,
                  image: np.ndarray | None = None) -> bytes:
    """One record: header + [mean | std] (h, w, 2c) in the cache dtype [+ the uint8 (S, S, 3) crop]."""
    data = HEADER.pack(int(index), int(label), int(flipped)) + np.asarray(moments).astype(_np_dtype(dtype)).tobytes()
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"a cached image must be uint8 (S, S, 3), got {image.dtype} {image.shape}")
        data += np.ascontiguousarray(image).tobytes()
    return data


def decode_record(data: bytes, shape: tuple[int, int, int], dtype: str,
                  image_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Record bytes -> {'index', 'label', 'flipped', 'mean' (h,w,c) f32, 'std' (h,w,c) f32[, 'image' uint8]}.

    `image_shape` (S, S, 3) for a cache that stores images; the record length is checked against the layout.
    """
    index, label, flipped = HEADER.unpack_from(data)
    h, w, c = shape
    item = _np_dtype(dtype).itemsize
    image_bytes = int(np.prod(image_shape)) if image_shape is not None else 0
    expected = HEADER.size + h * w * 2 * c * item + image_bytes
    if len(data) != expected:
        raise ValueError(f"latent cache record of {len(data)} bytes, expected {expected} for latents {shape} "
                         f"{dtype}" + (f" + image {tuple(image_shape)} uint8" if image_shape is not None else ""))
    moments = np.frombuffer(data, _np_dtype(dtype), count=h * w * 2 * c, offset=HEADER.size)
    moments = moments.reshape(h, w, 2 * c).astype(np.float32)
    out = {"index": np.int64(index), "label": np.int32(label), "flipped": np.bool_(flipped),
           "mean": moments[..., :c], "std": moments[..., c:]}
    if image_shape is not None:
        out["image"] = np.frombuffer(data, np.uint8, offset=expected - image_bytes).reshape(image_shape)
    return out


def image_shape(meta: dict[str, Any]) -> tuple[int, int, int] | None:
    """(S, S, 3) of the crops a cache stores, None for a cache without images (also any written before them)."""
    return (meta["image_size"], meta["image_size"], 3) if meta.get("store_images", False) else None


def _np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"latent cache dtype must be one of {DTYPES}, got {name!r}")
    return np.dtype(jax.numpy.bfloat16) if name == "bfloat16" else np.dtype(name)


def read_meta(cache_dir: str) -> dict[str, Any]:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{cache_dir!r} is not a latent cache (no {META_FILE}); create one with "
            "`python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=CACHE_DIR`"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a version {VERSION} {FORMAT} file")
    return meta


def write_meta(cache_dir: str, meta: dict[str, Any]) -> None:
    """Write meta.json atomically."""
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".{META_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(cache_dir, META_FILE))


def complete_chunk_files(cache_dir: str, meta: dict[str, Any]) -> list[str]:
    """All chunk files, checking that none is missing (an unfinished extraction is an error, not a subset)."""
    k = meta["num_chunks"]
    paths = [chunk_path(cache_dir, i, k) for i in range(k)]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"latent cache {cache_dir!r} is incomplete: {len(missing)} of {k} chunks missing "
            f"(e.g. {missing[0]}); rerun the extraction with the same --workdir to finish it"
        )
    stray = sorted(set(glob.glob(os.path.join(cache_dir, CHUNKS_DIR, "*.array_record"))) - set(paths))
    if stray:
        raise ValueError(f"latent cache {cache_dir!r} has chunk files of another layout: {stray[:3]}")
    return paths


def write_chunk(path: str, records: list[bytes]) -> None:
    """Write one chunk file atomically (temporary name, then rename): it exists only when complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per group: fast random access
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(tmp, path)


class _Decode(grain.transforms.Map):
    def __init__(self, shape: tuple[int, int, int], dtype: str, image: tuple[int, int, int] | None) -> None:
        self.shape, self.dtype, self.image = tuple(shape), dtype, image

    def map(self, element: bytes) -> dict[str, Any]:
        record = decode_record(element, self.shape, self.dtype, self.image)
        return {k: record[k] for k in ("mean", "std", "label", "image") if k in record}


def latent_dataset(
    config: LatentReadConfig, per_process_batch: int, process_index: int, process_count: int,
    rows: np.ndarray | None = None,
) -> tuple[grain.IterDataset, dict[str, Any]]:
    """This process's training batches of {'mean', 'std', 'label'[, 'image' uint8]} from the cache, and its meta.

    Seeded global shuffle, reshuffled each epoch, repeated forever; the process reads `rows` (default: the
    contiguous block `process_index`) of every global batch, so the global batches do not depend on the
    number of processes or workers.
    """
    meta = read_meta(config.cache_dir)
    source = grain.sources.ArrayRecordDataSource(complete_chunk_files(config.cache_dir, meta))
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(None)
    rows = pipeline.contiguous_rows(per_process_batch, process_index) if rows is None else rows
    ds = pipeline.GlobalBatchRows(ds, rows, per_process_batch * process_count, config.worker_count)
    ds = ds.map(_Decode(tuple(meta["latent_shape"]), meta["dtype"], image_shape(meta)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.read_threads), prefetch_buffer_size=64))
    it = it.batch(per_process_batch, drop_remainder=True)
    if config.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return it, meta


def build_latent_iterator(
    config: LatentReadConfig, mesh: Mesh, global_batch: int, images: bool = True
) -> tuple[InputIterator, dict[str, Any]]:
    """The training iterator over a latent cache (`config` is a job's `latents` section) and the cache meta.

    Batches hold 'mean', 'std' (float32), 'label' (int32) and, when the cache stores them and `images` is on,
    'image' (uint8 crops).
    """
    sharding = batch_sharding(mesh)
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by {count} processes")
    dataset, meta = latent_dataset(config, global_batch // count, jax.process_index(), count,
                                   local_rows(sharding, global_batch))
    # The image pipeline's checkpointable prefetching iterator, over the cache's fields.
    iterator = InputIterator(dataset, sharding, global_batch, config.prefetch, scale_on_device=False,
                             device_keys=("mean", "std", "label") + (("image",) if images else ()))
    return iterator, meta
