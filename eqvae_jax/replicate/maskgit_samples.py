"""Sample metrics of a MaskGIT run's checkpoints on `shapes`, the counterpart of dit_samples.py: class-conditional
samples (labels i % 8; the run's decoding settings and its `sample.seed`, so every arm, seed and checkpoint draws
the same randomness) decoded with the VQ model that made the run's token cache, scored with the shapes classifier
(`dit_samples.evaluate_checkpoint`: FID, precision, recall, IS, class accuracy) against held-out images.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from eqvae_jax.diffusion.sampling import generate_all
from eqvae_jax.maskgit import sampling
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.parallel.mesh import batch_divisor, make_mesh
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.maskgit import job as maskgit_job
from eqvae_jax.train.maskgit import state as mg_state
from eqvae_jax.train.maskgit.config import parse_config


class CheckpointSampler:
    """One compiled sampler for a MaskGIT run; `samples(update)` restores that checkpoint's sampling weights (the
    EMA when the run keeps one and `sample.use_ema`, else the params, as `python -m eqvae_jax.sample`)."""

    def __init__(self, workdir: str, num_samples: int):
        self.ckpt = Checkpointer(f"{workdir}/checkpoints")
        _, saved = self.ckpt.read_run()
        host = saved["host"]
        c = parse_config(ConfigDict(saved["config"]), check_cache=False)
        self.mesh = make_mesh(-1, 1)
        cfg = maskgit_job.model_config(c, host)
        self.target = mg_state.abstract_state(cfg, mg_state.make_optimizer(c.optim), self.mesh, c.fsdp_min_size,
                                              c.ema.enabled)
        self.use_ema = c.sample.use_ema and c.ema.enabled
        s = c.sample
        vq = build_autoencoder(maskgit_job.cache_tokenizer(host, s.vae))
        self.generate = sampling.make_generate(
            mg_state.functional_model(cfg), sampling.make_code_decoder(vq), self.mesh, steps=s.steps,
            schedule=s.schedule, sm_temp=s.sm_temp, r_temp=s.r_temp, cfg_scale=s.cfg_scale, randomize=s.randomize,
            class_labels="cycle")
        self.seed, self.num_samples = s.seed, num_samples
        divisor = batch_divisor(self.mesh)
        self.batch = -(-min(num_samples, 256) // divisor) * divisor

    def samples(self, update: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, H, W, 3), labels (N,)) of checkpoint `update`."""
        state = self.ckpt.restore(update, self.target).state
        params = state.ema if self.use_ema else state.params
        return generate_all(self.generate, params, self.seed, self.num_samples, self.batch, self.mesh)

    def close(self) -> None:
        self.ckpt.close()
