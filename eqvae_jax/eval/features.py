"""Inception features of image batches: one jitted program, the batch sharded over every device of a
('data', 'fsdp') mesh, safe on multi-host slices, with an on-disk cache per input file.

    net = inception.load(weights_dir)
    extractor = InceptionExtractor(net, batch_size=256)          # global batch; a multiple of the device count
    acts = extractor.from_npz("samples.npz")                      # adm_metrics.Activations (numpy, every process)
    acts = extractor.extract(batches_of_uint8_nhwc, total=n)      # any iterable of host batches
    feats = extractor.on_device(images)                           # a sharded jax.Array in, sharded features out

Every process iterates the same global batches (e.g. reads the same npz) and feeds only the rows its devices
hold (`jax.make_array_from_process_local_data`); results are gathered to every process with
`process_allgather`. The last batch is zero-padded to the global batch size and the padded rows are dropped,
so the features do not depend on the batch size or the device count (up to float rounding).

Cache: `from_npz(path)` stores the features next to the input (or in `cache_dir`) as
`<stem>.inception-<fingerprint>.npz` (pool, spatial, logits_unbiased + the source's size and mtime); the
fingerprint hashes the network's config and weights, so another Inception never reuses it, and a changed
input file is re-extracted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from eqvae_jax.eval.adm_metrics import Activations, EvaluationWarning, NpzImages
from eqvae_jax.eval.inception import InceptionV3
from eqvae_jax.memo import cached_when_hashable
from eqvae_jax.models.shapes_classifier import ShapesClassifier
from eqvae_jax.models.weights import flat_variables
from eqvae_jax.parallel.mesh import batch_divisor, batch_sharding, make_mesh, replicated

KEYS = ("pool", "spatial", "logits_unbiased")
PER_DEVICE_BATCH = 32
CACHE_VERSION = 1


@cached_when_hashable(maxsize=8)
def _compiled(graphdef: nnx.GraphDef, mesh: Mesh):
    """The feature pass for one network structure and mesh: state replicated, images/outputs batch-sharded."""
    batch = batch_sharding(mesh)

    def features(state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
        return nnx.merge(graphdef, state).features(images)

    return jax.jit(features, in_shardings=(replicated(mesh), batch), out_shardings=batch)


def local_rows(sharding: NamedSharding, batch: int) -> np.ndarray:
    """Rows of a global batch held by this process's devices, in order."""
    index_map = sharding.addressable_devices_indices_map((batch,))
    rows = sorted({r for sl in index_map.values() for r in range(*sl[0].indices(batch))})
    return np.asarray(rows, np.int64)


class InceptionExtractor:
    """Sharded Inception features (module docstring). `batch_size` is global (default 32 per device). `net` may
    also be the shapes classifier (the same `features()` outputs; shapes-domain metrics)."""

    def __init__(self, net: InceptionV3 | ShapesClassifier, mesh: Mesh | None = None, batch_size: int | None = None):
        self.mesh = mesh if mesh is not None else make_mesh(-1, 1)
        divisor = batch_divisor(self.mesh)
        self.batch_size = int(batch_size or PER_DEVICE_BATCH * divisor)
        if self.batch_size <= 0 or self.batch_size % divisor:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of the {divisor} devices "
                             "the batch is sharded over.")
        self.config = net.config
        graphdef, state = nnx.split(net)
        self._net = net
        self._state = jax.device_put(state, replicated(self.mesh))
        self._sharding = batch_sharding(self.mesh)
        self._rows = local_rows(self._sharding, self.batch_size)
        self._fn = _compiled(graphdef, self.mesh)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the network's config and weights (cache key)."""
        if self._fingerprint is None:
            config = self.config.to_dict() if hasattr(self.config, "to_dict") else dataclasses.asdict(self.config)
            h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
            for key, value in sorted(flat_variables(self._net).items()):
                h.update(key.encode())
                h.update(np.ascontiguousarray(value, np.float32).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def on_device(self, images: jax.Array) -> dict[str, jax.Array]:
        """Features of a global uint8 batch already on the mesh (e.g. decoded samples), sharded like it; no
        padding or gathering (its size must be a multiple of the device count)."""
        return self._fn(self._state, jax.device_put(images, self._sharding))

    def extract(self, batches: Iterable[np.ndarray], total: int | None = None, desc: str = "Inception features",
                progress: bool = True) -> Activations:
        """Features of uint8 (<= batch_size, H, W, 3) host batches (all of one H, W), concatenated in order."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
        show = progress and jax.process_index() == 0
        with tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False) as bar:
            pending = None
            for images in batches:
                images = np.asarray(images)
                n = len(images)
                if n == 0 or n > self.batch_size:
                    raise ValueError(f"a batch of {n} images; expected 1..{self.batch_size}.")
                if n < self.batch_size:  # pad; the padded rows' features are dropped below
                    pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
                    images = np.concatenate([images, pad])
                local = np.ascontiguousarray(images[self._rows])
                array = jax.make_array_from_process_local_data(self._sharding, local, images.shape)
                result = self._fn(self._state, array)  # dispatched; the previous batch is collected meanwhile
                if pending is not None:
                    self._collect(*pending, out, bar)
                pending = (result, n)
            if pending is not None:
                self._collect(*pending, out, bar)
        if not out["pool"]:
            raise ValueError("no images to extract features from.")
        return Activations(**{k: np.concatenate(v) for k, v in out.items()})

    @staticmethod
    def _collect(result: dict[str, jax.Array], n: int, out: dict[str, list[np.ndarray]], bar: tqdm) -> None:
        if jax.process_count() > 1:
            result = multihost_utils.process_allgather(result, tiled=True)
        for key in KEYS:
            out[key].append(np.asarray(result[key])[:n])
        bar.update(n)

    # ---- npz inputs with a cache ---------------------------------------------------------------------------

    def cache_path(self, path: str | os.PathLike, cache_dir: str | None = None) -> str:
        path = os.path.abspath(os.fspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.join(cache_dir or os.path.dirname(path), f"{stem}.inception-{self.fingerprint[:16]}.npz")

    def from_npz(self, path: str | os.PathLike, cache_dir: str | None = None, use_cache: bool = True,
                 progress: bool = True) -> Activations:
        """Features of an ADM batch's `arr_0` (validated by `NpzImages`), from the cache when it is current."""
        images = NpzImages(path)
        source = _source_meta(images.path, len(images))
        cache = self.cache_path(images.path, cache_dir) if use_cache else None
        if cache is not None:
            cached = _read_cache(cache, source, self.fingerprint)
            if cached is not None:
                return cached
        acts = self.extract(images.batches(self.batch_size), len(images),
                            desc=os.path.basename(images.path), progress=progress)
        if cache is not None and jax.process_index() == 0:
            _write_cache(cache, acts, source, self.fingerprint)
        return acts


def _source_meta(path: str, n: int) -> dict[str, int | str]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "num_images": n}


def _read_cache(cache: str, source: dict, fingerprint: str) -> Activations | None:
    if not os.path.isfile(cache):
        return None
    try:
        with np.load(cache) as data:
            meta = json.loads(str(data["meta"]))
            if meta != {"version": CACHE_VERSION, "source": source, "inception": fingerprint}:
                return None
            return Activations(**{k: data[k] for k in KEYS})
    except (OSError, ValueError, KeyError):  # a damaged cache is recomputed, never trusted
        return None


def _write_cache(cache: str, acts: Activations, source: dict, fingerprint: str) -> None:
    meta = json.dumps({"version": CACHE_VERSION, "source": source, "inception": fingerprint})
    tmp = f"{cache}.tmp{os.getpid()}.npz"
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez(tmp, meta=np.asarray(meta), **acts.as_dict())
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not write the feature cache {cache}: {e}", EvaluationWarning, stacklevel=3)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
