"""Sample metrics of a DiT/SiT run's checkpoints on `shapes`: class-conditional EMA samples (labels i % 8, the
run's sampler and its `sample.seed`, so every arm, seed and checkpoint draws the same noise) scored with the
shapes classifier (eval/shapes_metric.py: FID, precision, recall, IS, class accuracy) against held-out images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import ConfigDict

from eqvae_jax.diffusion import sampling
from eqvae_jax.eval.shapes_metric import sample_metrics
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.models.shapes_classifier import ShapesClassifier
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh, replicated
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.dit import state as dit_state
from eqvae_jax.train.dit.config import parse_config
from eqvae_jax.train.dit.job import cache_autoencoder

KEPT_SAMPLES = 64  # samples per checkpoint kept for the report's grids


class CheckpointSampler:
    """One compiled sampler for a DiT run; `samples(update)` restores that checkpoint's EMA weights."""

    def __init__(self, workdir: str, num_samples: int):
        self.ckpt = Checkpointer(f"{workdir}/checkpoints")
        _, saved = self.ckpt.read_run()
        host = saved["host"]
        c = parse_config(ConfigDict(saved["config"]), check_cache=False)
        self.mesh = make_mesh(-1, 1)
        cfg = c.dit_config(tuple(host["latent_shape"]))
        self.target = dit_state.abstract_state(cfg, c.seed, dit_state.make_optimizer(c.optim), self.mesh,
                                               c.fsdp_min_size)
        model = dit_state.functional_model(cfg, c.seed, replicated(self.mesh))
        decode = sampling.make_decoder(build_autoencoder(cache_autoencoder(host)), host["scaling_factor"],
                                       host["shift_factor"])
        self.generate = sampling.make_generate(model, decode, self.mesh, c.sampler, c.sample.num_steps,
                                               c.sample.cfg_scale, c.sample.guide_channels, c.sample.ode_method,
                                               class_labels="cycle")
        self.seed, self.num_samples = c.sample.seed, num_samples
        divisor = batch_divisor(self.mesh)
        self.batch = -(-min(num_samples, 256) // divisor) * divisor

    def samples(self, update: int) -> tuple[np.ndarray, np.ndarray]:
        params = self.ckpt.restore(update, self.target).state.ema
        return sampling.generate_all(self.generate, params, self.seed, self.num_samples, self.batch, self.mesh)

    def close(self) -> None:
        self.ckpt.close()


def evaluate_checkpoint(sampler: CheckpointSampler, update: int, classifier: ShapesClassifier,
                        reference: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(metrics, the first KEPT_SAMPLES samples, their labels) of one checkpoint."""
    images, labels = sampler.samples(update)
    metrics = sample_metrics(classifier, reference, images, labels)
    return {k: float(v) for k, v in metrics.items()}, images[:KEPT_SAMPLES], labels[:KEPT_SAMPLES]
