"""What the EQ fine-tuning job does differently for its two autoencoder families; everything else is shared.

                     KL autoencoder (trainer 'eqvae')          VQGAN (trainer 'eqvqgan')
  transformed latent   a posterior sample                        the pre-quantization features (then quantized)
  generator objective  equivariance.transformed_generator_loss   equivariance.transformed_vq_generator_loss
                       (LDM LPIPSWithDiscriminator)              (taming VQLPIPSWithDiscriminator)
  D step's forward     equivariance.reconstruct_transformed      equivariance.reconstruct_transformed_vq
  per log interval     -                                         code counts summed over the interval's micro-steps
                                                                 -> codebook/usage, codebook/perplexity
  monitoring           posterior-sample reconstructions; the     codebook reconstructions; the error on the
                       error on the posterior mean               pre-quantization features + code agreement under
                                                                 rotations; codebook usage of the held-out images
  export               diffusers AutoencoderKL + Flax weights    taming last.ckpt + model.yaml + Flax weights

A `Family` is static: the `StepSpec` carries it, so the jitted steps, the compile-variant bookkeeping (one program
per BranchPlan for G and D) and the loop are the same code for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from eqvae_jax.losses import equivariance
from eqvae_jax.models import kl_vae, vq_vae
from eqvae_jax.train.eqvae import evaluation


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str  # models.autoencoders kind
    # (vae, lpips, disc, images, plan, rot_k, key, update_step, loss config) -> (total, terms, (target, recon))
    generator_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]]
    # (vae, images, plan, rot_k, key) -> (target, reconstruction): the discriminator step's own forward
    reconstruct: Callable[..., tuple[jax.Array, jax.Array]]
    # generator terms that are arrays, returned by the G step as g/<name> and summed over each log interval
    summed_terms: tuple[str, ...]
    # {g/<name>: interval sum} -> scalars for the log line (codebook usage ...)
    interval_scalars: Callable[[Mapping[str, np.ndarray]], dict[str, float]] | None
    make_eval_step: Callable[[nnx.GraphDef, nnx.GraphDef | None, int], Callable[..., Any]]
    make_summary_fn: Callable[[nnx.GraphDef], Callable[..., Any]]
    export_name: str  # the end-of-run export's entry in the summary table
    console_fields: tuple[tuple[str, str], ...]
    summary_metrics: tuple[str, ...]


def _reconstruct_kl(vae: nnx.Module, images: jax.Array, plan: equivariance.BranchPlan, rot_k: jax.Array,
                    key: jax.Array) -> tuple[jax.Array, jax.Array]:
    target, recon, _ = equivariance.reconstruct_transformed(vae, images, plan, rot_k, key)
    return target, recon


def _reconstruct_vq(vq: nnx.Module, images: jax.Array, plan: equivariance.BranchPlan, rot_k: jax.Array,
                    key: jax.Array) -> tuple[jax.Array, jax.Array]:
    del key  # deterministic encoder
    target, recon, _ = equivariance.reconstruct_transformed_vq(vq, images, plan, rot_k)
    return target, recon


def codebook_scalars(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Codebook usage (fraction of codes used at least once) and perplexity of the codes the generator steps of
    one log interval quantized (whatever branch each drew: transformed features count as they were quantized)."""
    counts = sums.get("g/code_counts")
    if counts is None:
        return {}
    return {"codebook/usage": float(vq_vae.codebook_usage(counts)),
            "codebook/perplexity": float(vq_vae.perplexity(counts))}


_BRANCH_FIELDS = (("eq", "branch_g/equivariance"), ("lowres", "branch_g/lowres"), ("plain", "branch_g/plain"))
_SUMMARY = ("eval/equivariance/rotation", "eval/equivariance/scale", "eval/psnr", "eval/ssim", "eval/lpips")

KL = Family(
    kind=kl_vae.KIND,
    generator_loss=equivariance.transformed_generator_loss,
    reconstruct=_reconstruct_kl,
    summed_terms=(),
    interval_scalars=None,
    make_eval_step=evaluation.make_eval_step,
    make_summary_fn=evaluation.make_summary_fn,
    export_name="diffusers export",
    console_fields=(("g", "g/total"), ("l1", "g/rec_l1"), ("lpips", "g/lpips"), ("d_weight", "g/d_weight"),
                    ("d", "d/disc_loss"), *_BRANCH_FIELDS),
    summary_metrics=_SUMMARY,
)

VQ = Family(
    kind=vq_vae.KIND,
    generator_loss=equivariance.transformed_vq_generator_loss,
    reconstruct=_reconstruct_vq,
    summed_terms=("code_counts",),
    interval_scalars=codebook_scalars,
    make_eval_step=evaluation.make_vq_eval_step,
    make_summary_fn=evaluation.make_vq_summary_fn,
    export_name="taming export",
    console_fields=(("g", "g/total"), ("l1", "g/rec_l1"), ("lpips", "g/lpips"), ("cb", "g/codebook_loss"),
                    ("d_weight", "g/d_weight"), ("d", "d/disc_loss"), ("usage", "codebook/usage"),
                    ("ppl", "codebook/perplexity"), *_BRANCH_FIELDS),
    summary_metrics=(*_SUMMARY[:2], "eval/equivariance/codes/rotation", *_SUMMARY[2:], "eval/codebook_usage"),
)

FAMILIES = {f.kind: f for f in (KL, VQ)}


def family_of(kind: str) -> Family:
    """The family of a `model.kind` ('kl_vae' or 'vq_vae')."""
    return FAMILIES[kind]
