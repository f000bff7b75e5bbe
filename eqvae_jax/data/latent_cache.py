"""The latent cache: what an autoencoder made of each image, in ArrayRecord chunk files, and its readers.

Two contents, one machinery (extraction job eqvae_jax/train/latents, chunks, meta, atomic writes, resumption):
'moments' (a KL autoencoder's posterior mean and std per image, for DiT/SiT) and 'tokens' (a VQ autoencoder's
code indices per image, for MaskGIT; meta `content: tokens`). Layout of a cache directory:

    CACHE/meta.json                     what was encoded how (autoencoder, crop, flip mode and seed, crops and
                                        crop seed, latent or token shape, scale, images)
    CACHE/chunks/chunk-00007-of-00040.array_record

The source images are split into fixed chunks of `chunk_size` consecutive indices; chunk k is encoded by
process k % process_count and written to a temporary name, then renamed, so a chunk file exists only when it
is complete. A restarted extraction skips chunks whose file exists (whatever the process count).

A moments record is `<q index><i label><B flipped>` followed by the (h, w, 2c) array [mean | std] in the cache
dtype and, in a cache extracted with `store_images` (meta `store_images: true`), by the uint8 (S, S, 3) crop the
latent was encoded from, exactly as encoded (mirrored in a flipped record): REPA's teacher input. Caches without
the meta key have no images and read as before. At 256 px a crop is 196,608 bytes, six times a float32 latent.
A tokens record is `<q index><i label><B flipped><H crop>` followed by the (h, w) int16 code indices [and the
crop]: 527 bytes for 16 x 16 tokens.
Augmentations stored per image (meta `records_per_image`, consecutive records of one image): `crops` crops
(1 unless the extraction's transform is random; crop c of image i is drawn by `crop_rng(crop_seed, i, c)`), each
in the orientations of `flip`: 'random' one record, horizontally mirrored when `flip_draws(flip_seed, index)`
says so (about half: the reference's extraction applies RandomHorizontalFlip once per image; crop c > 0 has its
own coin); 'copy' both orientations; 'none' only the crop as is.
Reading: the latent reader yields every record once per epoch; DiT/SiT draws z = mean + std * eps every step
(REPA/edm2 style) and maps it with the VAE's latent scale: (z - shift_factor) * scaling_factor (0.18215 for
SD-VAE-based EQ-VAE). The token reader yields one image per element and picks one of its stored augmentations
per epoch (`variant_draws`), so an epoch sees every image once, as MaskGIT's on-the-fly augmentation does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from eqvae_jax import storage
from eqvae_jax.data import pipeline
from eqvae_jax.data.iterator import InputIterator, batch_sharding
from eqvae_jax.parallel.mesh import local_rows

FORMAT = "eqvae-jax-latents"
VERSION = 1
META_FILE = "meta.json"
CHUNKS_DIR = "chunks"
HEADER = struct.Struct("<qiB")  # moments records: source index, label, flipped
TOKEN_HEADER = struct.Struct("<qiBH")  # tokens records: source index, label, flipped, crop number
DTYPES = ("float32", "float16", "bfloat16")
CONTENTS = ("moments", "tokens")
TOKEN_DTYPE = "int16"  # code indices of codebooks up to 32768 entries


@dataclasses.dataclass(frozen=True)
class LatentReadConfig:
    """How a training job reads a latent or token cache (the fields of its `latents` / `tokens` config section;
    `seed` orders the records and picks each image's augmentation of the epoch in a token cache)."""

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


def _hash(seed: int, *values: np.ndarray | int) -> np.ndarray:
    """SplitMix64 chained over (seed, *values): uint64 bits, the same whatever the batching and process count."""
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.asarray(seed, np.int64).astype(np.uint64))
        for v in values:
            bits = _splitmix64(bits + np.asarray(v, np.int64).astype(np.uint64))
    return bits


def flip_draws(seed: int, indices: np.ndarray, crops: np.ndarray | int = 0) -> np.ndarray:
    """bool per source index: is the image stored mirrored (flip='random')? A fair coin per image from a hash
    (SplitMix64) of (seed, index), so the same whatever the batching, chunking and process count; crop c > 0 of
    an image (`crops`, broadcast against `indices`) has its own coin, hash(seed, index, c)."""
    indices = np.asarray(indices, np.int64)
    bits = np.where(np.asarray(crops) == 0, _hash(seed, indices), _hash(seed, indices, crops))
    return (bits >> np.uint64(63)).astype(bool)


def crop_rng(seed: int, index: int, crop: int) -> np.random.Generator:
    """The generator of crop number `crop` of source image `index` (a random transform's window): seeded by
    (seed, index, crop) alone, so a restarted or re-chunked extraction draws the same crops."""
    return np.random.default_rng([int(seed), int(index), int(crop)])


def variant_draws(seed: int, epoch: int | np.ndarray, groups: np.ndarray, per_image: int) -> np.ndarray:
    """Which of its `per_image` stored augmentations image group `g` shows in `epoch` (token reader): uniform,
    from hash(seed, epoch, g)."""
    if per_image == 1:
        return np.zeros(np.shape(groups), np.int64)
    return (_hash(seed, epoch, groups) % np.uint64(per_image)).astype(np.int64)


def content(meta: dict[str, Any]) -> str:
    """'moments' or 'tokens' (caches written before tokens existed hold moments)."""
    return meta.get("content", "moments")


def records_per_image(meta: dict[str, Any]) -> int:
    """Stored augmentations per image: crops x orientations (2 with flip='copy')."""
    return int(meta.get("crops", 1)) * (2 if meta.get("flip") == "copy" else 1)


def chunk_name(chunk: int, num_chunks: int) -> str:
    return f"chunk-{chunk:05d}-of-{num_chunks:05d}.array_record"


def chunk_path(cache_dir: str, chunk: int, num_chunks: int) -> str:
    return os.path.join(cache_dir, CHUNKS_DIR, chunk_name(chunk, num_chunks))


def encode_record(index: int, label: int, flipped: bool, moments: np.ndarray, dtype: str,
                  image: np.ndarray | None = None) -> bytes:
    """One record: header + [mean | std] (h, w, 2c) in the cache dtype [+ the uint8 (S, S, 3) crop]."""
    data = HEADER.pack(int(index), int(label), int(flipped)) + np.asarray(moments).astype(_np_dtype(dtype)).tobytes()
    return data + _image_bytes(image)


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


def _image_bytes(image: np.ndarray | None) -> bytes:
    if image is None:
        return b""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"a cached image must be uint8 (S, S, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image).tobytes()


def encode_token_record(index: int, label: int, flipped: bool, crop: int, tokens: np.ndarray,
                        image: np.ndarray | None = None) -> bytes:
    """One tokens record: header + (h, w) int16 code indices [+ the uint8 (S, S, 3) crop as encoded]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token record: code indices must be an integer (h, w) array, got {tokens.dtype} "
                         f"{tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int16).max):
        raise ValueError(f"token record: code indices {tokens.min()}..{tokens.max()} do not fit int16")
    header = TOKEN_HEADER.pack(int(index), int(label), int(flipped), int(crop))
    return header + tokens.astype(np.int16).tobytes() + _image_bytes(image)


def decode_token_record(data: bytes, shape: tuple[int, int],
                        image_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Record bytes -> {'index', 'label', 'flipped', 'crop', 'tokens' (h, w) int32[, 'image' uint8]}."""
    index, label, flipped, crop = TOKEN_HEADER.unpack_from(data)
    h, w = shape
    image_bytes = int(np.prod(image_shape)) if image_shape is not None else 0
    expected = TOKEN_HEADER.size + h * w * 2 + image_bytes
    if len(data) != expected:
        raise ValueError(f"token cache record of {len(data)} bytes, expected {expected} for tokens {tuple(shape)} "
                         "int16" + (f" + image {tuple(image_shape)} uint8" if image_shape is not None else ""))
    tokens = np.frombuffer(data, np.int16, count=h * w, offset=TOKEN_HEADER.size).reshape(h, w).astype(np.int32)
    out = {"index": np.int64(index), "label": np.int32(label), "flipped": np.bool_(flipped), "crop": np.int32(crop),
           "tokens": tokens}
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
    path = epath.Path(cache_dir) / META_FILE  # local or gs://
    if not path.is_file():
        raise FileNotFoundError(
            f"{cache_dir!r} is not a latent cache (no {META_FILE}); create one with "
            "`python -m eqvae_jax.main --config=configs/extract_latents.py --workdir=CACHE_DIR`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a version {VERSION} {FORMAT} file")
    return meta


_MAKE = {"moments": "configs/extract_latents.py with a KL autoencoder",
         "tokens": "configs/extract_tokens.py with a VQ autoencoder"}


def require_content(meta: dict[str, Any], want: str, cache_dir: str) -> None:
    """A clear error when a cache holds the other content (e.g. DiT pointed at a token cache)."""
    if content(meta) != want:
        raise ValueError(f"{cache_dir!r} holds {content(meta)}, not {want}: make a {want} cache with {_MAKE[want]}")


def write_meta(cache_dir: str, meta: dict[str, Any]) -> None:
    """Write meta.json atomically (local or gs://: `storage.write_atomic`)."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2, sort_keys=True)
    storage.write_atomic(os.path.join(cache_dir, META_FILE), text.encode())


def complete_chunk_files(cache_dir: str, meta: dict[str, Any]) -> list[str]:
    """All chunk files, checking that none is missing (an unfinished extraction is an error, not a subset)."""
    k = meta["num_chunks"]
    paths = [chunk_path(cache_dir, i, k) for i in range(k)]
    missing = [os.path.basename(p) for p in paths if not epath.Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"latent cache {cache_dir!r} is incomplete: {len(missing)} of {k} chunks missing "
            f"(e.g. {missing[0]}); rerun the extraction with the same --workdir to finish it"
        )
    listed = epath.Path(cache_dir, CHUNKS_DIR).glob("*.array_record")
    stray = sorted({os.path.join(cache_dir, CHUNKS_DIR, p.name) for p in listed} - set(paths))
    if stray:
        raise ValueError(f"latent cache {cache_dir!r} has chunk files of another layout: {stray[:3]}")
    return paths


def write_chunk(path: str, records: list[bytes]) -> None:
    """Write one chunk file atomically (`storage.atomic_file`: a temporary name, then a rename; on gs:// a local
    file uploaded as one object, as ArrayRecord writes local files only): it exists only when complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with storage.atomic_file(path) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per group: fast random access
        for r in records:
            writer.write(r)
        writer.close()


class _Decode(grain.transforms.Map):
    def __init__(self, shape: tuple[int, int, int], dtype: str, image: tuple[int, int, int] | None) -> None:
        self.shape, self.dtype, self.image = tuple(shape), dtype, image

    def map(self, element: bytes) -> dict[str, Any]:
        record = decode_record(element, self.shape, self.dtype, self.image)
        return {k: record[k] for k in ("mean", "std", "label", "image") if k in record}


class _DecodeTokens(grain.transforms.Map):
    def __init__(self, shape: tuple[int, int], image: tuple[int, int, int] | None) -> None:
        self.shape, self.image = tuple(shape), image

    def map(self, element: bytes) -> dict[str, Any]:
        record = decode_token_record(element, self.shape, self.image)
        return {"tokens": record["tokens"], "label": record["label"]}


class _PickVariant(grain.MapDataset):
    """Stream of image groups (each `per_image` consecutive records of the source) -> one record per element:
    the variant `variant_draws(seed, epoch, group)`, where epoch = position // groups in the repeated stream."""

    def __init__(self, parent: grain.MapDataset, source: Any, groups: int, per_image: int, seed: int) -> None:
        super().__init__(parent)
        self._source, self._groups, self._per_image, self._seed = source, groups, per_image, seed

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group = int(self._parent[index])
        variant = int(variant_draws(self._seed, index // self._groups, np.asarray(group), self._per_image))
        return self._source[group * self._per_image + variant]

    def __str__(self) -> str:
        return f"PickVariant(groups={self._groups}, per_image={self._per_image})"


def _batches(ds: grain.MapDataset, config: LatentReadConfig, decode: grain.transforms.Map, per_process_batch: int,
             process_index: int, process_count: int, rows: np.ndarray | None) -> grain.IterDataset:
    """The shared tail of both readers: this process's rows of every global batch, decoded and batched."""
    rows = pipeline.contiguous_rows(per_process_batch, process_index) if rows is None else rows
    ds = pipeline.GlobalBatchRows(ds, rows, per_process_batch * process_count, config.worker_count)
    ds = ds.map(decode)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.read_threads), prefetch_buffer_size=64))
    it = it.batch(per_process_batch, drop_remainder=True)
    if config.worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return it


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
    require_content(meta, "moments", config.cache_dir)
    source = grain.sources.ArrayRecordDataSource(complete_chunk_files(config.cache_dir, meta))
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(None)
    decode = _Decode(tuple(meta["latent_shape"]), meta["dtype"], image_shape(meta))
    return _batches(ds, config, decode, per_process_batch, process_index, process_count, rows), meta


def token_dataset(
    config: LatentReadConfig, per_process_batch: int, process_index: int, process_count: int,
    rows: np.ndarray | None = None,
) -> tuple[grain.IterDataset, dict[str, Any]]:
    """This process's training batches of {'tokens' (h, w) int32, 'label' int32} from a token cache, and its meta.

    One element per image: the images are shuffled (seeded, reshuffled each epoch, repeated forever) and each
    shows one of its stored augmentations (crops x flips), drawn per image and epoch from `config.seed`. Like
    the latent reader, the global batches do not depend on the number of processes or workers, and the
    iterator's checkpointed state resumes them exactly.
    """
    meta = read_meta(config.cache_dir)
    require_content(meta, "tokens", config.cache_dir)
    source = grain.sources.ArrayRecordDataSource(complete_chunk_files(config.cache_dir, meta))
    per_image = records_per_image(meta)
    if len(source) % per_image:
        raise ValueError(f"token cache {config.cache_dir!r}: {len(source)} records are not whole groups of "
                         f"{per_image} per image (crops x flips)")
    groups = len(source) // per_image
    ds = grain.MapDataset.range(groups)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = _PickVariant(ds.repeat(None), source, groups, per_image, config.seed)
    decode = _DecodeTokens(tuple(meta["token_shape"]), image_shape(meta))
    return _batches(ds, config, decode, per_process_batch, process_index, process_count, rows), meta


def _iterator(kind: str, config: LatentReadConfig, mesh: Mesh, global_batch: int, keys: tuple[str, ...],
              ) -> tuple[InputIterator, dict[str, Any]]:
    sharding = batch_sharding(mesh)
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by {count} processes")
    make = latent_dataset if kind == "moments" else token_dataset
    dataset, meta = make(config, global_batch // count, jax.process_index(), count, local_rows(sharding, global_batch))
    # The image pipeline's checkpointable prefetching iterator, over the cache's fields.
    return InputIterator(dataset, sharding, global_batch, config.prefetch, scale_on_device=False,
                         device_keys=keys), meta


def build_latent_iterator(
    config: LatentReadConfig, mesh: Mesh, global_batch: int, images: bool = True
) -> tuple[InputIterator, dict[str, Any]]:
    """The training iterator over a latent cache (`config` is a job's `latents` section) and the cache meta.

    Batches hold 'mean', 'std' (float32), 'label' (int32) and, when the cache stores them and `images` is on,
    'image' (uint8 crops).
    """
    return _iterator("moments", config, mesh, global_batch, ("mean", "std", "label") + (("image",) if images else ()))


def build_token_iterator(config: LatentReadConfig, mesh: Mesh, global_batch: int,
                         ) -> tuple[InputIterator, dict[str, Any]]:
    """The training iterator over a token cache (`config` is the MaskGIT job's `tokens` section) and the cache
    meta: batches of 'tokens' (B, h, w) int32 and 'label' (B,) int32, one stored augmentation per image."""
    return _iterator("tokens", config, mesh, global_batch, ("tokens", "label"))
