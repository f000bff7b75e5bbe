"""The chain's stages (docs/replication.md), each a call of an existing job's `run(config, workdir)` with a
config derived in jobs.py, in its own directory under the run's root. Stages of a family run only when the config
enables it (`kl`, `vq`); the classifier and the report serve both.

  classifier         the shapes classifier (fixed seed), its held-out accuracy
  pretrain           a KL autoencoder from random init, plain reconstruction
  finetune_eq        EQ fine-tuning from the pretrained weights
  finetune_control   the same with the EQ branch probability at 0
  eval               eval_vae of both arms (PSNR, SSIM, shapes-rFID, equivariance error, TwoNN) + the latent
                     spectrum and pictures (latent_analysis.py)
  latents_eq/control the latent caches (the extraction job, shapes train split with labels)
  dit_<arm>_seed<s>  a class-conditional DiT/SiT per arm and seed, sample metrics at every kept checkpoint
  vq_...             the VQ family's stages (vq_stages.py): VQ pretrain, EQ / control fine-tunes, eval, token
                     caches, a MaskGIT per arm and seed
  report             report.md, metrics.json, curves.png, samples.png, latents.png
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eqvae_jax.eval.shapes_metric import ClassifierTraining, reference_images, train_classifier
from eqvae_jax.models import shapes_classifier
from eqvae_jax.replicate import dit_samples, jobs, latent_analysis, report, vq_stages
from eqvae_jax.replicate.config import ARMS, ReplicateConfig
from eqvae_jax.replicate.runner import Stage, read_marker
from eqvae_jax.replicate.scoring import score_checkpoints
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.eqvae import job as eqvae_job
from eqvae_jax.train.eval_vae import job as eval_job
from eqvae_jax.train.latents import job as latents_job

# Seconds per unit on 2 shared CPU cores (docs/replication.md: a shortened default run, compiles included, so
# pessimistic), for the first ETA; replaced by this run's own rates as stages finish. Units: classifier steps,
# autoencoder updates, evaluated images (both arms), extracted images, DiT / MaskGIT updates + sampling work.
# The VQ kinds' are twice those measured on 2 quiet cores (the KL kinds' were measured at load average 8-9).
DEFAULT_RATES = {"classifier": 0.6, "autoencoder": 1.3, "eval": 0.25, "extract": 0.007, "dit": 0.12, "report": 1.0,
                 "vq_autoencoder": 1.1, "vq_eval": 0.06, "tokens": 0.005, "maskgit": 0.18}


def classifier_stage(c: ReplicateConfig, root: str) -> dict[str, Any]:
    k = c.classifier
    model, result = train_classifier(ClassifierTraining(
        size=c.image_size, seed=c.seed, steps=k.steps, batch_size=k.batch_size, train_images=k.train_images,
        eval_images=k.eval_images, channels=tuple(k.channels)))
    dst = jobs.paths(root)["classifier"]
    if not os.path.isdir(dst):
        shapes_classifier.save(model, dst)
    print(f"classifier: held-out accuracy {result['held_out_accuracy']:.4f} in {result['seconds']:.0f}s")
    return result


def autoencoder_stage(c: ReplicateConfig, root: str, arm: str) -> dict[str, Any]:
    name = "pretrain" if arm == "pretrain" else f"finetune_{arm}"
    summary = eqvae_job.run(jobs.autoencoder(c, root, arm), os.path.join(root, name))
    return {"updates": summary.get("updates"), "last_metrics": summary.get("last_metrics", {})}


def eval_stage(c: ReplicateConfig, root: str) -> dict[str, Any]:
    out = eval_job.run(jobs.evaluation(c, root), os.path.join(root, "eval"))
    p, e = jobs.paths(root), c.eval
    analysis, rows = latent_analysis.analyse({arm: p[f"vae_{arm}"] for arm in ARMS}, c.image_size, c.shapes_seed,
                                             e.num_images, e.batch_size, e.hf_cutoff, e.preview_images)
    np.savez(os.path.join(root, "eval", "latent_pictures.npz"), names=np.asarray(list(rows)),
             **{f"row{i}": r for i, r in enumerate(rows.values())})
    return {"eval_vae": out["results"], "latents": analysis}


def extract_stage(c: ReplicateConfig, root: str, arm: str) -> dict[str, Any]:
    return dict(latents_job.run(jobs.extraction(c, root, arm), jobs.paths(root)[f"latents_{arm}"]))


def dit_stage(c: ReplicateConfig, root: str, arm: str, seed: int) -> dict[str, Any]:
    """Train (or resume) the DiT, then score every kept checkpoint (each score saved as it is computed)."""
    scale = read_marker(root, "eval")["results"]["latents"][arm]["scaling_factor"]
    workdir = os.path.join(root, f"dit_{arm}_seed{seed}")
    dit_job.run(jobs.dit(c, root, arm, seed, scale), workdir)
    classifier = shapes_classifier.load(jobs.paths(root)["classifier"])
    reference = reference_images(c.image_size, c.dit.num_samples, seed=c.shapes_seed)
    sampler = dit_samples.CheckpointSampler(workdir, c.dit.num_samples)
    updates = range(c.dit.eval_every, c.dit.updates + 1, c.dit.eval_every)
    curve = score_checkpoints(sampler, workdir, updates, classifier, reference, f"dit {arm} seed {seed}")
    return {"scaling_factor": scale, "curve": curve}


def kl_stages(c: ReplicateConfig, root: str) -> list[Stage]:
    """The KL family's stages, in order (after the classifier, which both families share)."""
    a, d = c.autoencoder, c.dit
    stages = [Stage("pretrain", "autoencoder", a.pretrain_updates, lambda: autoencoder_stage(c, root, "pretrain"))]
    stages += [Stage(f"finetune_{arm}", "autoencoder", a.finetune_updates,
                     lambda arm=arm: autoencoder_stage(c, root, arm)) for arm in ARMS]
    stages.append(Stage("eval", "eval", 2 * c.eval.num_images, lambda: eval_stage(c, root)))
    stages += [Stage(f"latents_{arm}", "extract", c.latents.train_images, lambda arm=arm: extract_stage(c, root, arm))
               for arm in ARMS]
    checkpoints = d.updates // d.eval_every
    stages += [Stage(f"dit_{arm}_seed{seed}", "dit", d.updates + checkpoints * d.num_samples * d.sampling_steps / 50,
                     lambda arm=arm, seed=seed: dit_stage(c, root, arm, seed))
               for seed in d.seeds for arm in ARMS]
    return stages


def build(c: ReplicateConfig, root: str) -> list[Stage]:
    """The stage list of this config, in order: the classifier, the KL family's stages, the VQ family's, the
    report (redone whenever the stages before it change: `Stage.inputs`)."""
    stages = [Stage("classifier", "classifier", c.classifier.steps, lambda: classifier_stage(c, root))]
    if c.kl:
        stages += kl_stages(c, root)
    if c.vq:
        stages += vq_stages.build(c, root)
    stages.append(Stage("report", "report", 1, lambda: report.write(c, root), inputs=tuple(s.name for s in stages)))
    return stages
