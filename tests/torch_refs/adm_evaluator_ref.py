"""A line-by-line numpy transcription of ADM's evaluator statistics (openai/guided-diffusion@22e0df8,
evaluations/evaluator.py), the independent reference for eqvae_jax.eval.adm_metrics.

Kept as close to the original's structure as numpy allows: `FIDStatistics.frechet_distance`,
`Evaluator.compute_statistics / compute_inception_score / compute_prec_recall`, `ManifoldEstimator` with its
row/column blocks and `_numpy_partition` thread pool, `DistanceBlock` and `_batch_pairwise_distances`.
The TF pieces become numpy with TF's dtypes: the softmax graph is a float32 softmax of `pool @ W`; the fp16
distance block casts to float16, squares in float16, sums the squares with float32 accumulation, multiplies
in float16 with float32 accumulation (TF's GPU kernels), does the element-wise ops in float16 (one rounding
each) and falls back to the float32 graph when any distance of the block is not finite (`tf.cond`).
`scipy.linalg.sqrtm(..., disp=False)` becomes `sqrtm(...)` (the argument is gone in scipy 1.18).
"""

from __future__ import annotations

import warnings
from functools import partial
from multiprocessing import cpu_count
from multiprocessing.pool import ThreadPool

import numpy as np
from scipy import linalg


class FIDStatistics:
    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other, eps=1e-6):
        mu1, sigma1 = self.mu, self.sigma
        mu2, sigma2 = other.mu, other.sigma

        mu1 = np.atleast_1d(mu1)
        mu2 = np.atleast_1d(mu2)

        sigma1 = np.atleast_2d(sigma1)
        sigma2 = np.atleast_2d(sigma2)

        assert mu1.shape == mu2.shape
        assert sigma1.shape == sigma2.shape

        diff = mu1 - mu2

        with warnings.catch_warnings():  # disp=False: no message from the first attempt
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                          stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                m = np.max(np.abs(covmean.imag))
                raise ValueError(f"Imaginary component {m}")
            covmean = covmean.real

        tr_covmean = np.trace(covmean)

        return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    mu = np.mean(activations, axis=0)
    sigma = np.cov(activations, rowvar=False)
    return FIDStatistics(mu, sigma)


def _softmax_graph(acts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """tf.nn.softmax(tf.matmul(acts, w)) in float32."""
    logits = np.matmul(acts.astype(np.float32), w.astype(np.float32))
    e = np.exp(logits - np.max(logits, axis=1, keepdims=True))
    return (e / np.sum(e, axis=1, keepdims=True)).astype(np.float32)


def compute_inception_score(activations: np.ndarray, w: np.ndarray, split_size: int = 5000,
                            softmax_batch_size: int = 512) -> float:
    softmax_out = []
    for i in range(0, len(activations), softmax_batch_size):
        acts = activations[i : i + softmax_batch_size]
        softmax_out.append(_softmax_graph(acts, w))
    preds = np.concatenate(softmax_out, axis=0)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _batch_pairwise_distances(U, V, dtype):
    norm_u = np.sum(np.square(U), 1, dtype=np.float32).astype(dtype)
    norm_v = np.sum(np.square(V), 1, dtype=np.float32).astype(dtype)
    norm_u = np.reshape(norm_u, [-1, 1])
    norm_v = np.reshape(norm_v, [1, -1])
    matmul = np.matmul(U.astype(np.float32), V.astype(np.float32).T).astype(dtype)
    D = np.maximum(norm_u - 2 * matmul + norm_v, dtype(0.0))
    return D


class DistanceBlock:
    def pairwise_distances(self, U, V):
        U = np.asarray(U, np.float32)
        V = np.asarray(V, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            distance_block_16 = _batch_pairwise_distances(U.astype(np.float16), V.astype(np.float16), np.float16)
        if np.all(np.isfinite(distance_block_16)):
            return distance_block_16.astype(np.float32)
        return _batch_pairwise_distances(U, V, np.float32)

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        dist32 = self.pairwise_distances(batch_1, batch_2).astype(np.float32)[..., None]
        batch_1_in = np.any(dist32 <= radii_2, axis=1)
        batch_2_in = np.any(dist32 <= radii_1[:, None], axis=0)
        return batch_1_in, batch_2_in


def _numpy_partition(arr, kth, **kwargs):
    num_workers = min(cpu_count(), len(arr))
    chunk_size = len(arr) // num_workers
    extra = len(arr) % num_workers

    start_idx = 0
    batches = []
    for i in range(num_workers):
        size = chunk_size + (1 if i < extra else 0)
        batches.append(arr[start_idx : start_idx + size])
        start_idx += size

    with ThreadPool(num_workers) as pool:
        return list(pool.map(partial(np.partition, kth=kth, **kwargs), batches))


class ManifoldEstimator:
    def __init__(self, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(3,), clamp_to_percentile=None,
                 eps=1e-5):
        self.distance_block = DistanceBlock()
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = nhood_sizes
        self.num_nhoods = len(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        num_images = len(features)

        radii = np.zeros([num_images, self.num_nhoods], dtype=np.float32)
        distance_batch = np.zeros([self.row_batch_size, num_images], dtype=np.float32)
        seq = np.arange(max(self.nhood_sizes) + 1, dtype=np.int32)

        for begin1 in range(0, num_images, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_images)
            row_batch = features[begin1:end1]

            for begin2 in range(0, num_images, self.col_batch_size):
                end2 = min(begin2 + self.col_batch_size, num_images)
                col_batch = features[begin2:end2]

                distance_batch[0 : end1 - begin1, begin2:end2] = self.distance_block.pairwise_distances(
                    row_batch, col_batch
                )

            radii[begin1:end1, :] = np.concatenate(
                [x[:, self.nhood_sizes] for x in _numpy_partition(distance_batch[0 : end1 - begin1, :], seq, axis=1)],
                axis=0,
            )

        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            batch_1 = features_1[begin_1:end_1]
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                batch_2 = features_2[begin_2:end_2]
                batch_1_in, batch_2_in = self.distance_block.less_thans(
                    batch_1, radii_1[begin_1:end_1], batch_2, radii_2[begin_2:end_2]
                )
                features_1_status[begin_1:end_1] |= batch_1_in
                features_2_status[begin_2:end_2] |= batch_2_in
        return (
            np.mean(features_2_status.astype(np.float64), axis=0),
            np.mean(features_1_status.astype(np.float64), axis=0),
        )


def compute_prec_recall(activations_ref, activations_sample, **estimator_kwargs):
    manifold_estimator = ManifoldEstimator(**estimator_kwargs)
    radii_1 = manifold_estimator.manifold_radii(activations_ref)
    radii_2 = manifold_estimator.manifold_radii(activations_sample)
    pr = manifold_estimator.evaluate_pr(activations_ref, radii_1, activations_sample, radii_2)
    return (float(pr[0][0]), float(pr[1][0]))


def evaluate(ref_pool, ref_spatial, sample_pool, sample_spatial, sample_for_is, w, ref_stats=None,
             **estimator_kwargs):
    """ADM's `main()` after the activations: IS on the samples, FID/sFID sample-vs-ref, P/R (ref, sample).
    `ref_stats` = (mu, sigma, mu_s, sigma_s) of a reference batch that carries them (read_statistics)."""
    if ref_stats is not None:
        ref_stats_pool, ref_stats_spatial = FIDStatistics(*ref_stats[:2]), FIDStatistics(*ref_stats[2:])
    else:
        ref_stats_pool, ref_stats_spatial = compute_statistics(ref_pool), compute_statistics(ref_spatial)
    sample_stats, sample_stats_spatial = compute_statistics(sample_pool), compute_statistics(sample_spatial)
    prec, recall = compute_prec_recall(ref_pool, sample_pool, **estimator_kwargs)
    return {
        "inception_score": compute_inception_score(sample_for_is, w),
        "fid": float(sample_stats.frechet_distance(ref_stats_pool)),
        "sfid": float(sample_stats_spatial.frechet_distance(ref_stats_spatial)),
        "precision": prec,
        "recall": recall,
    }
