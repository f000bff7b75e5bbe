"""FID, sFID, Inception Score, precision and recall exactly as ADM's evaluator computes them, on numpy features.

The reference is openai/guided-diffusion@22e0df8 `evaluations/evaluator.py`, run as
`python evaluator.py REF_BATCH SAMPLE_BATCH` (the *first* argument is the reference). Given Inception features
(`eqvae_jax.eval.inception`: pool (N, 2048), spatial (N, 2023), logits_unbiased (N, 1008)):

- statistics: mu = mean(features, axis=0), sigma = np.cov(features, rowvar=False). A reference npz that
  carries `mu/sigma/mu_s/sigma_s` supplies them instead of its images' features (ADM's `read_statistics`).
- FID (pool) and sFID (spatial): ||mu_s - mu_r||^2 + tr(sigma_s) + tr(sigma_r) - 2 tr(sqrtm(sigma_s sigma_r)),
  sample statistics first. If the square root is not finite, eps = 1e-6 is added to both diagonals and it is
  recomputed (with a warning); a complex result is an error unless the imaginary parts of its diagonal are all
  within 1e-3 of 0, then its real part is used. `scipy.linalg.sqrtm` with its current signature.
- Inception Score of the *samples*: p = softmax(logits_unbiased) in float32 (ADM: softmax(pool_3 @ W) with W
  the unbiased `softmax/logits/MatMul` weight); the rows are cut into consecutive splits of 5,000 (the last
  one may be partial); per split exp(mean_i sum_c p_ic (log p_ic - log mean_i p_ic)); the score is the plain
  mean over splits (no std).
- precision / recall (Kynkaanniemi et al. 2019 as ADM adapted it), on pool features: each point's radius is
  its squared distance to its 3rd nearest neighbour in its own set (itself included at distance 0, i.e. the
  4th smallest entry of its distance row). precision = fraction of samples within the radius of at least one
  reference point; recall = fraction of reference points within the radius of at least one sample.
  Distances are squared Euclidean, max(|u|^2 - 2 u.v + |v|^2, 0), computed per block of 10,000 x 10,000
  rows in float16 (float16 squares summed with float32 accumulation, a float16 matmul with float32
  accumulation, float16 element-wise ops), and the whole block is recomputed in float32 if any float16
  distance is not finite. The block sizes therefore matter and are ADM's by default.

Small batches are not errors: IS over one partial split, P/R over what there is (they need at least 4 points
per set, else NaN with a warning); FID warns below 2,048 images (an N-1 < 2048 rank covariance; FID is biased
upward at small N). Empty batches and feature dimensions that disagree are errors.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from collections.abc import Iterator

import numpy as np
from scipy import linalg

from eqvae_jax import storage

FID_EPS = 1e-6
IS_SPLIT_SIZE = 5000
NHOOD = 3
ROW_BATCH_SIZE = 10000
COL_BATCH_SIZE = 10000
MIN_FID_IMAGES = 2048
IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class EvaluationWarning(UserWarning):
    """A result that is computed but should be read with care (small batch, eps-regularised FID)."""


class BadInputError(ValueError):
    """An input batch or statistics file the evaluator cannot use (the CLI exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Gaussian statistics of one feature set: mu (D,), sigma (D, D)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Statistics:
        """ADM's `compute_statistics`: mean (in the features' dtype) and np.cov (float64)."""
        features = np.asarray(features)
        if features.ndim != 2 or len(features) == 0:
            raise BadInputError(f"statistics need a non-empty (N, D) feature array, got shape {features.shape}.")
        if len(features) < 2:
            warnings.warn("statistics of a single image: the covariance is undefined (NaN).", EvaluationWarning,
                          stacklevel=2)
            return cls(np.mean(features, axis=0), np.full((features.shape[1],) * 2, np.nan))
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))

    def check(self, what: str) -> None:
        mu, sigma = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise BadInputError(f"{what}: mu {np.shape(self.mu)} and sigma {np.shape(self.sigma)} are not (D,) and "
                                "(D, D).")


@dataclasses.dataclass(frozen=True)
class Activations:
    """Inception features of one batch, numpy: pool (N, 2048), spatial (N, 2023), logits_unbiased (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits_unbiased: np.ndarray

    def __post_init__(self) -> None:
        n = {len(self.pool), len(self.spatial), len(self.logits_unbiased)}
        if len(n) != 1 or any(np.ndim(a) != 2 for a in (self.pool, self.spatial, self.logits_unbiased)):
            raise BadInputError("Activations: pool, spatial and logits_unbiased must be (N, D) arrays of one N.")

    def __len__(self) -> int:
        return len(self.pool)

    def statistics(self) -> tuple[Statistics, Statistics]:
        """(pool statistics, spatial statistics)."""
        return Statistics.of(self.pool), Statistics.of(self.spatial)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"pool": self.pool, "spatial": self.spatial, "logits_unbiased": self.logits_unbiased}


# --------------------------------------------------------------------------------------------------------
# FID / IS
# --------------------------------------------------------------------------------------------------------


def frechet_distance(sample: Statistics, ref: Statistics, eps: float = FID_EPS, what: str = "FID") -> float:
    """ADM's `FIDStatistics.frechet_distance` with `sample` as self (see the module docstring)."""
    sample.check(f"{what} sample statistics")
    ref.check(f"{what} reference statistics")
    mu1, mu2 = np.atleast_1d(sample.mu), np.atleast_1d(ref.mu)
    sigma1, sigma2 = np.atleast_2d(sample.sigma), np.atleast_2d(ref.sigma)
    if mu1.shape != mu2.shape:
        raise BadInputError(f"{what}: sample and reference features have different dimensions ({mu1.shape[0]} vs "
                            f"{mu2.shape[0]}); were they extracted by the same network?")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        return float("nan")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # ADM's disp=False: the first attempt is silent
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"{what}: singular covariance product; adding {eps} to the diagonal of both covariances "
                      "(ADM's fallback).", EvaluationWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"{what}: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2).")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32 (TF's `tf.nn.softmax` of the float32 logits)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - np.max(z, axis=1, keepdims=True))
    return e / np.sum(e, axis=1, keepdims=True)


def inception_score(logits_unbiased: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's `compute_inception_score` from the unbiased logits (module docstring)."""
    logits_unbiased = np.asarray(logits_unbiased)
    if logits_unbiased.ndim != 2 or len(logits_unbiased) == 0:
        raise BadInputError(f"Inception Score needs non-empty (N, classes) logits, got {logits_unbiased.shape}.")
    preds = softmax(logits_unbiased)
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, len(preds), split_size):
            part = preds[start : start + split_size]
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    score = float(np.mean(scores))
    if not np.isfinite(score):
        warnings.warn("Inception Score is not finite: a softmax probability underflowed to 0 (0 * log 0; ADM "
                      "gives NaN too).", EvaluationWarning, stacklevel=2)
    return score


# --------------------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------------------


def _squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) in the dtype of u and v, with float32 accumulation of the sums/matmul."""
    dtype = u.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is detected by the caller
        norm_u = np.sum(np.square(u), axis=1, dtype=np.float32).astype(dtype)[:, None]
        norm_v = np.sum(np.square(v), axis=1, dtype=np.float32).astype(dtype)[None, :]
        uv = np.matmul(u.astype(np.float32), v.astype(np.float32).T).astype(dtype)
        return np.maximum(norm_u - 2 * uv + norm_v, dtype(0))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's `DistanceBlock.pairwise_distances`: float16 squared distances, or float32 if any is not finite."""
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    d16 = _squared_distances(u.astype(np.float16), v.astype(np.float16))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    return _squared_distances(u, v)


def manifold_radii(features: np.ndarray, k: int = NHOOD, row_batch_size: int = ROW_BATCH_SIZE,
                   col_batch_size: int = COL_BATCH_SIZE) -> np.ndarray:
    """(N,) float32: each point's squared distance to its k-th nearest neighbour (self at index 0)."""
    n = len(features)
    radii = np.zeros((n,), np.float32)
    rows = np.zeros((min(row_batch_size, n), n), np.float32)
    for r0 in range(0, n, row_batch_size):
        r1 = min(r0 + row_batch_size, n)
        for c0 in range(0, n, col_batch_size):
            c1 = min(c0 + col_batch_size, n)
            rows[: r1 - r0, c0:c1] = pairwise_distances(features[r0:r1], features[c0:c1])
        radii[r0:r1] = np.partition(rows[: r1 - r0], k, axis=1)[:, k]
    return radii


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = NHOOD, row_batch_size: int = ROW_BATCH_SIZE,
                     col_batch_size: int = COL_BATCH_SIZE) -> tuple[float, float]:
    """ADM's `compute_prec_recall(ref, sample)` -> (precision, recall) on (N, D) features (module docstring)."""
    ref, sample = np.asarray(ref, np.float32), np.asarray(sample, np.float32)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise BadInputError(f"precision/recall: reference {ref.shape} and sample {sample.shape} features differ.")
    if min(len(ref), len(sample)) <= k:
        warnings.warn(f"precision/recall need more than k={k} points per set (reference {len(ref)}, samples "
                      f"{len(sample)}): NaN.", EvaluationWarning, stacklevel=2)
        return float("nan"), float("nan")
    radii_ref = manifold_radii(ref, k, row_batch_size, col_batch_size)
    radii_sample = manifold_radii(sample, k, row_batch_size, col_batch_size)
    ref_in = np.zeros((len(ref),), bool)  # reference point inside the sample manifold (recall)
    sample_in = np.zeros((len(sample),), bool)  # sample inside the reference manifold (precision)
    for r0 in range(0, len(ref), row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, len(sample), col_batch_size):
            c1 = c0 + col_batch_size
            d = pairwise_distances(ref[r0:r1], sample[c0:c1])
            ref_in[r0:r1] |= np.any(d <= radii_sample[None, c0:c1], axis=1)
            sample_in[c0:c1] |= np.any(d <= radii_ref[r0:r1, None], axis=0)
    return float(np.mean(sample_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))


# --------------------------------------------------------------------------------------------------------
# The five numbers
# --------------------------------------------------------------------------------------------------------


def evaluate(ref: Activations, sample: Activations,
             ref_stats: tuple[Statistics, Statistics] | None = None,
             sample_stats: tuple[Statistics, Statistics] | None = None,
             *, split_size: int = IS_SPLIT_SIZE, k: int = NHOOD, row_batch_size: int = ROW_BATCH_SIZE,
             col_batch_size: int = COL_BATCH_SIZE) -> dict[str, float]:
    """ADM's `main()` after feature extraction: {'inception_score', 'fid', 'sfid', 'precision', 'recall'}.

    `ref` is the reference batch (ADM's first argument), `sample` the generated one. `*_stats` are precomputed
    (pool, spatial) statistics that replace those of the features (a reference npz's mu/sigma/mu_s/sigma_s).
    """
    for name, acts in (("reference", ref), ("sample", sample)):
        if len(acts) == 0:
            raise BadInputError(f"the {name} batch is empty.")
    for attr in ("pool", "spatial", "logits_unbiased"):
        a, b = getattr(ref, attr).shape[1], getattr(sample, attr).shape[1]
        if a != b:
            raise BadInputError(f"{attr} features: reference has {a} dimensions, samples {b}; extract both with "
                                "the same Inception.")
    for name, acts in (("reference", ref), ("sample", sample)):
        if len(acts) < MIN_FID_IMAGES:
            warnings.warn(f"the {name} batch has {len(acts)} images: FID/sFID from fewer than {MIN_FID_IMAGES} "
                          "images are biased upward (rank-deficient covariance) and not comparable to 50K/10K "
                          "numbers.", EvaluationWarning, stacklevel=2)
    ref_pool, ref_spatial = ref_stats if ref_stats is not None else ref.statistics()
    sample_pool, sample_spatial = sample_stats if sample_stats is not None else sample.statistics()
    precision, recall = precision_recall(ref.pool, sample.pool, k, row_batch_size, col_batch_size)
    return {
        "inception_score": inception_score(sample.logits_unbiased, split_size),
        "fid": frechet_distance(sample_pool, ref_pool, what="FID"),
        "sfid": frechet_distance(sample_spatial, ref_spatial, what="sFID"),
        "precision": precision,
        "recall": recall,
    }


# --------------------------------------------------------------------------------------------------------
# ADM .npz batches
# --------------------------------------------------------------------------------------------------------


class NpzImages:
    """The `arr_0` images of an ADM batch (uint8, (N, H, W, 3)), validated up front and streamed in batches
    without loading the whole array (a 50K 256px batch is 9.8 GB)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise BadInputError(f"{self.path}: no such file.")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = z.namelist()
                if f"{IMAGES_KEY}.npy" not in names:
                    keys = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
                    raise BadInputError(f"{self.path}: no '{IMAGES_KEY}' image array (the ADM batch layout); it "
                                        f"holds {keys}.")
                with z.open(f"{IMAGES_KEY}.npy") as f:
                    shape, fortran, dtype = _read_header(f)
        except zipfile.BadZipFile as e:
            raise BadInputError(f"{self.path}: not an .npz file ({e}).") from e
        self.shape, self.dtype, self._streamable = tuple(shape), np.dtype(dtype), not fortran and not dtype.hasobject
        if self.dtype != np.uint8:
            raise BadInputError(f"{self.path}: {IMAGES_KEY} is {self.dtype}; ADM batches are uint8 images in [0, 255].")
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise BadInputError(f"{self.path}: {IMAGES_KEY} has shape {self.shape}; expected (N, H, W, 3) NHWC RGB.")
        if self.shape[0] == 0:
            raise BadInputError(f"{self.path}: the batch is empty (0 images).")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (<= batch_size, H, W, 3) uint8 arrays, in file order."""
        if not self._streamable:
            arr = np.load(self.path)[IMAGES_KEY]
            for start in range(0, len(arr), batch_size):
                yield arr[start : start + batch_size]
            return
        row_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as z, z.open(f"{IMAGES_KEY}.npy") as f:
            _read_header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise BadInputError(f"{self.path}: {IMAGES_KEY} is truncated at image {start}.")
                yield np.frombuffer(data, np.uint8).reshape((n, *self.shape[1:]))


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise BadInputError(f"unsupported .npy format version {version}")


def read_statistics(path: str | os.PathLike) -> tuple[Statistics, Statistics] | None:
    """The (pool, spatial) statistics stored in an ADM batch (mu, sigma, mu_s, sigma_s), or None without 'mu'."""
    path = os.fspath(path)
    with np.load(path) as data:
        if "mu" not in data.files:
            return None
        missing = [k for k in STATS_KEYS if k not in data.files]
        if missing:
            raise BadInputError(f"{path}: has 'mu' but not {', '.join(missing)} (ADM reference batches carry "
                                f"{', '.join(STATS_KEYS)}).")
        stats = Statistics(data["mu"], data["sigma"]), Statistics(data["mu_s"], data["sigma_s"])
    stats[0].check(f"{path} mu/sigma")
    stats[1].check(f"{path} mu_s/sigma_s")
    return stats


def write_batch(path: str | os.PathLike, images: np.ndarray,
                stats: tuple[Statistics, Statistics] | None = None, **extra: np.ndarray) -> None:
    """Write an ADM batch atomically: arr_0 (uint8 NHWC) [+ mu, sigma, mu_s, sigma_s] [+ extra arrays]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise BadInputError(f"ADM batches hold uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}.")
    arrays: dict[str, np.ndarray] = {IMAGES_KEY: images, **extra}
    if stats is not None:
        (pool, spatial) = stats
        arrays.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    with storage.atomic_file(path, suffix=".npz") as tmp:  # local or gs://
        np.savez(tmp, **arrays)

