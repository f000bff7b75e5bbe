"""The VQ family's stages (docs/replication.md), each a call of an existing job with a config from vq_jobs.py, in
its own directory under the run's root:

  vq_pretrain           a VQ autoencoder (taming's VQGAN, small) from random init, plain reconstruction
  vq_finetune_eq        EQ-VQGAN fine-tuning from the pretrained weights (transform on the pre-quantization features)
  vq_finetune_control   the same with the EQ branch probability at 0
  vq_eval               eval_vae of both arms (PSNR, SSIM, shapes-rFID, equivariance error, TwoNN) + codebook
                        usage / perplexity and the features' spectrum (vq_analysis.py)
  tokens_eq/control     the token caches (the extraction job, shapes train split with labels)
  maskgit_<arm>_seed<s> a class-conditional MaskGIT per arm and seed, sample metrics at every kept checkpoint
"""

from __future__ import annotations

import os
from typing import Any

from eqvae_jax.eval.shapes_metric import reference_images
from eqvae_jax.models import shapes_classifier
from eqvae_jax.replicate import jobs, maskgit_samples, vq_analysis, vq_jobs
from eqvae_jax.replicate.config import ARMS, ReplicateConfig
from eqvae_jax.replicate.runner import Stage
from eqvae_jax.replicate.scoring import score_checkpoints
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eval_vae import job as eval_job
from eqvae_jax.train.latents import job as latents_job
from eqvae_jax.train.maskgit import job as maskgit_job


def autoencoder_stage(c: ReplicateConfig, root: str, arm: str) -> dict[str, Any]:
    name = "vq_pretrain" if arm == "pretrain" else f"vq_finetune_{arm}"
    summary = eqvae_job.run(vq_jobs.autoencoder(c, root, arm, jobs.paths(root)["cache"]), os.path.join(root, name))
    return {"updates": summary.get("updates"), "last_metrics": summary.get("last_metrics", {})}


def eval_stage(c: ReplicateConfig, root: str) -> dict[str, Any]:
    p, e = jobs.paths(root), c.eval
    out = eval_job.run(vq_jobs.evaluation(c, root, p["classifier"], p["cache"]), os.path.join(root, "vq_eval"))
    weights = {arm: vq_jobs.paths(root)[f"vq_{arm}"] for arm in ARMS}
    codes = vq_analysis.analyse(weights, c.image_size, c.shapes_seed, e.num_images, e.batch_size, e.hf_cutoff)
    return {"eval_vae": out["results"], "codes": codes}


def extract_stage(c: ReplicateConfig, root: str, arm: str) -> dict[str, Any]:
    config = vq_jobs.extraction(c, root, arm, jobs.paths(root)["cache"])
    return dict(latents_job.run(config, vq_jobs.paths(root)[f"tokens_{arm}"]))


def maskgit_stage(c: ReplicateConfig, root: str, arm: str, seed: int) -> dict[str, Any]:
    """Train (or resume) the MaskGIT, then score every kept checkpoint as the DiT stage does (same classifier,
    reference images and sample count)."""
    m, p = c.maskgit, jobs.paths(root)
    workdir = os.path.join(root, f"maskgit_{arm}_seed{seed}")
    maskgit_job.run(vq_jobs.maskgit(c, root, arm, seed, p["cache"]), workdir)
    classifier = shapes_classifier.load(p["classifier"])
    reference = reference_images(c.image_size, m.num_samples, seed=c.shapes_seed)
    sampler = maskgit_samples.CheckpointSampler(workdir, m.num_samples)
    updates = range(m.eval_every, m.updates + 1, m.eval_every)
    return {"curve": score_checkpoints(sampler, workdir, updates, classifier, reference,
                                       f"maskgit {arm} seed {seed}")}


def build(c: ReplicateConfig, root: str) -> list[Stage]:
    """The VQ family's stages, in order (after the classifier, which both families share)."""
    v, m = c.vq_autoencoder, c.maskgit
    stages = [Stage("vq_pretrain", "vq_autoencoder", v.pretrain_updates,
                    lambda: autoencoder_stage(c, root, "pretrain"))]
    stages += [Stage(f"vq_finetune_{arm}", "vq_autoencoder", v.finetune_updates,
                     lambda arm=arm: autoencoder_stage(c, root, arm)) for arm in ARMS]
    stages.append(Stage("vq_eval", "vq_eval", 2 * c.eval.num_images, lambda: eval_stage(c, root)))
    stages += [Stage(f"tokens_{arm}", "tokens", c.tokens.train_images, lambda arm=arm: extract_stage(c, root, arm))
               for arm in ARMS]
    checkpoints = m.updates // m.eval_every
    stages += [Stage(f"maskgit_{arm}_seed{seed}", "maskgit",
                     m.updates + checkpoints * m.num_samples * m.sampling_steps / 50,
                     lambda arm=arm, seed=seed: maskgit_stage(c, root, arm, seed))
               for seed in m.seeds for arm in ARMS]
    return stages
