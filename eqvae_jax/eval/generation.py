"""Generation metrics of a diffusion model during training: gFID-10K monitoring with ADM's evaluator.

    gfid = GenerationEvaluator(generate, extractor, "VIRTUAL_imagenet256_labeled.npz", num_samples=10_000,
                               batch_size=256, seed=0)
    gfid(ema_params)   # {'fid', 'sfid', 'inception_score', 'precision', 'recall'}

`generate(params, seed, indices)` is `diffusion.sampling.make_generate`'s jitted sampler (uint8 images sharded
over the batch): sample i depends only on the seed and i, so successive evaluations of one run see the same noise
and labels, and `python -m eqvae_jax.sample` with the same settings draws the same images (up to the last bits of
floating-point reduction order where the weights are sharded differently). Each batch's Inception features are
computed where the samples are (`InceptionExtractor.on_device`) and only the features reach the host (gathered
from every process). The reference batch's features are extracted once and cached beside it
(`InceptionExtractor.from_npz`); its precomputed mu/sigma (ADM's reference layout) replace the statistics of its
images for FID/sFID, and its images' features serve precision/recall, as `python -m eqvae_jax.eval_samples` does.
Numbers from 10K samples are monitoring: FID is biased upward at small N (the paper's gFID uses 50K samples).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eqvae_jax.eval import adm_metrics
from eqvae_jax.eval.features import KEYS, InceptionExtractor
from eqvae_jax.parallel.mesh import batch_divisor, batch_sharding, local_rows


class GenerationEvaluator:
    """ADM metrics of `num_samples` samples from `generate` against a reference batch (module docstring)."""

    def __init__(self, generate: Callable[..., tuple[jax.Array, jax.Array]], extractor: InceptionExtractor,
                 reference: str, num_samples: int, batch_size: int, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        shards = batch_divisor(extractor.mesh)
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {shards} batch shards")
        self.generate, self.extractor = generate, extractor
        self.reference_path = os.fspath(reference)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._sharding = batch_sharding(extractor.mesh)
        self._rows = local_rows(self._sharding, batch_size)
        self._reference: tuple[adm_metrics.Activations, Any] | None = None

    def reference(self) -> tuple[adm_metrics.Activations, Any]:
        """(reference features, its precomputed statistics or None), extracted or read from the cache once."""
        if self._reference is None:
            acts = self.extractor.from_npz(self.reference_path, progress=False)
            self._reference = acts, adm_metrics.read_statistics(self.reference_path)
        return self._reference

    def sample_features(self, params: Any) -> adm_metrics.Activations:
        """Inception features of the `num_samples` samples of `params` (every process gets them)."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
        seed = jnp.asarray(self.seed, jnp.uint32)

        def collect(features: dict[str, jax.Array], n: int) -> None:
            if jax.process_count() > 1:
                features = multihost_utils.process_allgather(features, tiled=True)
            for k in KEYS:
                out[k].append(np.asarray(features[k])[:n])

        pending = None
        for start in range(0, self.num_samples, self.batch_size):
            index = np.arange(start, start + self.batch_size, dtype=np.int32)
            indices = jax.make_array_from_process_local_data(self._sharding, index[self._rows], (self.batch_size,))
            images, _ = self.generate(params, seed, indices)
            current = (self.extractor.on_device(images), min(self.batch_size, self.num_samples - start))
            if pending is not None:  # collected while the devices work on the next batch
                collect(*pending)
            pending = current
        collect(*pending)
        return adm_metrics.Activations(**{k: np.concatenate(v) for k, v in out.items()})

    def __call__(self, params: Any) -> dict[str, float]:
        """{'fid', 'sfid', 'inception_score', 'precision', 'recall'} of the samples of `params`."""
        ref, ref_stats = self.reference()
        sample = self.sample_features(params)
        return adm_metrics.evaluate(ref, sample, ref_stats=ref_stats)
