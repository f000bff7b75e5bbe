"""Schemas and checks of the EQ fine-tuning job, for both autoencoder families.

One job (train/eqvae) fine-tunes either family; the config's `trainer` picks the schema:

  trainer 'eqvae'    `EQVAEConfig`: a KL autoencoder (SD-VAE and relatives), `loss` = `LossConfig`
  trainer 'eqvqgan'  `EQVQGANConfig`: a taming VQGAN, `loss` = `VQLossConfig`

Both inherit `FinetuneConfig` (model, discriminator, LPIPS, transform, optimizer, EMA, data, evaluation); each
adds the typed objective of its family as `loss`, so the section is always the objective that is used (no
inactive sibling section whose edits would do nothing) and its defaults are that family's recipe. `model.kind`
must agree with the trainer.

`EQVAEConfig` holds the reference recipe as defaults (zelaki/eqvae `eqvae_config.yaml` + `main.py`): two Adams
with betas (0.5, 0.9) at lr = accumulate(2) * batch(80) * 4.5e-6 = 7.2e-4, constant; 80 images per micro-step
(8 GPUs x 10) and 2 micro-steps per update; 54,470 updates (5 OpenImages epochs); GAN from update 0 (adaptive
weight x 0.5, one per 10 images as per GPU); KL 1e-6; LPIPS 1.0 with dropout on; the 0.5 / 0.125 / 0.375 branch
mix with scales k/32, k = 8..31; seed 23. `EQVQGANConfig` keeps that fine-tuning recipe and takes the
objective and base learning rate from taming's `imagenet_vqgan.yaml` (its docstring says what was chosen where
neither source gives a value). `parse_config` turns a ConfigDict into the schema its `trainer` names and checks
everything that can be checked before a model is built: every problem is listed at once (unknown keys with
suggestions, batch/mesh splits, weight paths, the model family, and every transform the sampler can draw
against the autoencoder's and discriminator's shapes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from ml_collections import ConfigDict

from eqvae_jax.convert import vq_vae as convert_vq_vae
from eqvae_jax.data.config import DataConfig
from eqvae_jax.losses import resample
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.losses.equivariance import Branch, TransformConfig, all_plans
from eqvae_jax.losses.vq import VQLossConfig
from eqvae_jax.models import kl_vae, vq_vae
from eqvae_jax.models.autoencoders import AutoencoderSpec
from eqvae_jax.parallel.mesh import mesh_shape
from eqvae_jax.train.config import CheckpointConfig, LogConfig, RunConfig, run_problems, weights_dir_problem
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect

D_STEP_TRANSFORMS = ("redraw", "shared")


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    weights: str = ""  # a converted LDM discriminator (python -m eqvae_jax.convert --kind discriminator); '' = init
    ndf: int = 64
    n_layers: int = 3
    # BatchNorm statistics groups: 0 = groups of 10 images, the reference's per-GPU batch (one group per batch
    # shard when the micro-batch is not a multiple of 10); G > 0 = G groups; 1 = statistics of the whole batch.
    stats_groups: int = 0


@dataclasses.dataclass(frozen=True)
class LpipsConfig:
    weights: str = ""  # a converted LPIPS dir; '' (with loss.perceptual_weight 0) skips LPIPS; 'random': demo only


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 4.5e-6
    scale_lr: bool = True  # lr = accumulate * global_batch_size * base_lr (the reference's --scale_lr)
    b1: float = 0.5
    b2: float = 0.9
    eps: float = 1e-8
    accumulate: int = 2  # micro-steps per optimizer update (reference accumulate_grad_batches)


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    enabled: bool = False  # the reference has no EMA of the autoencoder (eq-vae-ema: configs/sdvae_ft.py:ema)
    decay: float = 0.9999  # the eq-vae-ema model card does not publish its decay; DiT's


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic monitoring on held-out images (not the paper's 50K evaluation: see eqvae_jax.eval_samples)."""

    every_updates: int = 1000
    batches: int = 8  # held-out batches for PSNR/SSIM/LPIPS/equivariance error (0 = no periodic eval)
    images: int = 8  # images in the reconstruction grid
    global_batch_size: int = 0  # 0 = the training global_batch_size


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """The sections both schemas share (the EQ-VAE fine-tuning recipe as defaults); see the module docstring."""

    seed: int = 23  # reference seed_everything(23)
    pretrain_updates: int = 0  # plain-reconstruction updates before EQ fine-tuning (demo from random init)
    global_batch_size: int = 80  # per micro-step: 8 GPUs x 10 in the reference; x accumulate 2 = 160 per update
    checkpoint: CheckpointConfig = CheckpointConfig(every_updates=1000)
    log: LogConfig = LogConfig(every_updates=25)
    # Converted weights (python -m eqvae_jax.convert), float32 compute (the reference trains in fp32).
    model: AutoencoderSpec = dataclasses.field(default_factory=AutoencoderSpec)
    disc: DiscConfig = DiscConfig()
    lpips: LpipsConfig = LpipsConfig()
    transform: TransformConfig = TransformConfig()
    # 'redraw': the discriminator step draws its own transform and runs its own forward pass (reference);
    # 'shared': it reuses the generator step's (target, reconstruction) pair (one autoencoder forward fewer).
    d_step_transform: str = "redraw"
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def learning_rate(self) -> float:
        o = self.optim
        return float(o.accumulate * self.global_batch_size * o.base_lr) if o.scale_lr else float(o.base_lr)

    @property
    def eval_batch_size(self) -> int:
        return self.eval.global_batch_size or self.global_batch_size

    @property
    def export_at_end(self) -> bool:
        """Whether the end of training exports the autoencoder (the family's format + Flax weights)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class EQVAEConfig(FinetuneConfig):
    """EQ-VAE fine-tuning of a KL autoencoder (trainer 'eqvae')."""

    trainer: str = "eqvae"
    # The eq-vae release: 5 epochs of OpenImages (train, 1,743,042 images) at 160 images per update
    # = 5 * 10,894 = 54,470 updates (the paper rounds one epoch to ~10K updates). The reference run's own count
    # rather than the rounded 5 x 10K = 50K: what matters for a fine-tune, whichever dataset feeds it (54,470
    # updates are ~6.8 ImageNet epochs).
    total_updates: int = 54_470
    loss: LossConfig = LossConfig()
    export_diffusers: bool = True  # write WORKDIR/export/{diffusers,flax} at the end of training

    @property
    def export_at_end(self) -> bool:
        return self.export_diffusers


# ImageNet train (1,281,167 images) x 5 epochs / 160 images per update, rounded up.
VQ_TOTAL_UPDATES = -(-5 * 1_281_167 // 160)


@dataclasses.dataclass(frozen=True)
class EQVQGANConfig(FinetuneConfig):
    """EQ-VQGAN: EQ-VAE fine-tuning of a taming VQGAN (trainer 'eqvqgan'; paper section 3.3).

    The paper gives no recipe for its VQ-GAN fine-tune. Defaults: the objective of taming's
    `imagenet_vqgan.yaml` (`VQLossConfig`: codebook 1.0, LPIPS 1.0, hinge GAN with adaptive weight x 0.8,
    disc_start 0 for a fine-tune) and its optimizer (Adam betas (0.5, 0.9), base lr 4.5e-6 scaled by the images
    per update as taming's main.py does: accumulate_grad_batches * n_gpus * batch_size * base_lr); the batch,
    accumulation, data crop, branch mix and seed of the EQ-VAE fine-tune (taming's per-GPU batch of 3 on an
    unstated number of GPUs cannot be reproduced; EQ-VAE's 8 x 10 images x 2 micro-steps is the only batch its
    authors published for an EQ fine-tune), so lr = 2 * 80 * 4.5e-6 = 7.2e-4 as in the KL job; length 5 ImageNet
    epochs (the KL release's 5 epochs, on the data MaskGIT's tokenizer serves) = 40,037 updates. Scales are
    k/16, k = 4..15 (0.25 .. 0.9375, the KL grid's range): the f16 model's 16x16 latent at 256 px needs
    16 * s integral, which k/32 gives only for even k.
    """

    trainer: str = "eqvqgan"
    total_updates: int = VQ_TOTAL_UPDATES  # 40,037: 5 ImageNet epochs at 160 images per update
    model: AutoencoderSpec = dataclasses.field(
        default_factory=lambda: AutoencoderSpec(kind=vq_vae.KIND, preset="taming_f16_n1024"))
    transform: TransformConfig = TransformConfig(scale_numerators=tuple(range(4, 16)), scale_denominator=16)
    loss: VQLossConfig = VQLossConfig()
    # Write WORKDIR/export/{taming,flax} at the end of training (taming: last.ckpt + model.yaml, loadable by taming
    # and the MaskGIT code).
    export_taming: bool = True

    @property
    def export_at_end(self) -> bool:
        return self.export_taming


SCHEMAS: dict[str, type[FinetuneConfig]] = {"eqvae": EQVAEConfig, "eqvqgan": EQVQGANConfig}
KINDS = {"eqvae": kl_vae.KIND, "eqvqgan": vq_vae.KIND}  # the model family each trainer fine-tunes


def defaults(trainer: str = "eqvae") -> ConfigDict:
    """The schema of `trainer` as a ConfigDict with the reference values (config files start here)."""
    return default_config(SCHEMAS[trainer])


def disc_stats_groups(config: FinetuneConfig, batch_shards: int) -> int:
    """The discriminator's BatchNorm group count (see DiscConfig.stats_groups)."""
    if config.disc.stats_groups:
        return config.disc.stats_groups
    batch = config.global_batch_size
    return batch // 10 if batch % 10 == 0 else batch_shards


def parse_config(config: ConfigDict, num_devices: int | None = None) -> FinetuneConfig:
    """The typed config of the schema `config.trainer` names ('eqvae' when absent), or a ConfigError listing
    every problem (touches no device beyond counting them)."""
    trainer = config.get("trainer", "eqvae") if hasattr(config, "get") else "eqvae"
    if trainer not in SCHEMAS:
        raise ConfigError([f"trainer must be one of {sorted(SCHEMAS)} for this job, not {trainer!r}"])
    parsed, problems = parse_collect(SCHEMAS[trainer], config)
    problems += semantic_problems(parsed, jax.device_count() if num_devices is None else num_devices)
    if problems:
        raise ConfigError(problems)
    return parsed


def semantic_problems(c: FinetuneConfig, num_devices: int) -> list[str]:
    model_problems = c.model.problems("model")
    if c.model.kind != KINDS[c.trainer]:  # first: the other problems of a wrong family follow from it
        model_problems = [f"model.kind={c.model.kind!r}, but trainer {c.trainer!r} fine-tunes a "
                          f"{KINDS[c.trainer]!r} model (trainer 'eqvae': kl_vae, configs/sdvae_ft.py; 'eqvqgan': "
                          "vq_vae, configs/vqgan_ft.py)"] + model_problems
    problems = run_problems(c, num_devices) + model_problems + c.data.problems()
    try:
        data, fsdp = mesh_shape(num_devices, c.mesh.data, c.mesh.fsdp)
        if c.eval_batch_size % (data * fsdp):
            problems.append(f"eval.global_batch_size={c.eval_batch_size} is not divisible by the {data * fsdp} "
                            "batch shards")
    except ValueError:
        pass  # reported by run_problems
    if c.disc.stats_groups and c.global_batch_size % c.disc.stats_groups:
        problems.append(f"disc.stats_groups={c.disc.stats_groups} does not divide global_batch_size="
                        f"{c.global_batch_size}")
    if c.loss.adaptive_weight_groups and c.global_batch_size % c.loss.adaptive_weight_groups:
        problems.append(f"loss.adaptive_weight_groups={c.loss.adaptive_weight_groups} does not divide "
                        f"global_batch_size={c.global_batch_size}")
    problems += [p for p in [weights_dir_problem("disc.weights", c.disc.weights, required=False)] if p]
    if c.lpips.weights not in ("", "random"):
        problems += [p for p in [weights_dir_problem("lpips.weights", c.lpips.weights)] if p]
    elif c.lpips.weights == "" and c.loss.perceptual_weight:
        problems.append("loss.perceptual_weight > 0 needs lpips.weights (a converted LPIPS dir, or 'random')")
    if c.d_step_transform not in D_STEP_TRANSFORMS:
        problems.append(f"d_step_transform must be one of {D_STEP_TRANSFORMS}, not {c.d_step_transform!r}")
    if c.eval.every_updates < 1 or c.eval.batches < 0 or c.eval.images < 0:
        problems.append("need eval.every_updates >= 1, eval.batches >= 0 and eval.images >= 0")
    if c.optim.accumulate < 1:
        problems.append(f"optim.accumulate must be positive, got {c.optim.accumulate}")
    if not 0 <= c.pretrain_updates <= c.total_updates:
        problems.append("need 0 <= pretrain_updates <= total_updates")
    if not model_problems:
        problems += shape_problems(c)
        if isinstance(c, EQVQGANConfig) and c.export_taming:
            try:
                convert_vq_vae.config_to_taming_yaml(c.model.model_config())
            except ValueError as e:
                problems.append(f"export_taming: the model cannot be written as a taming checkpoint ({e}); set "
                                "export_taming=False (the Flax weights are exported either way)")
    return problems


def grid_problem(transform: TransformConfig, image_size: int, factor: int) -> str | None:
    """Why some equivariance scales k/den do not fit the latent grid (None when all do).

    The transformed latent is decoded to `factor` x its size and compared with the transformed image, so
    latent_side * k / den must be an integer: e.g. an f16 model at 256 px (16 px latent) with scales k/32 needs
    even k (scales j/16); the f8 KL model at 256 px (32 px latent) takes every k/32.
    """
    latent, den = image_size // factor, transform.scale_denominator
    bad = [k for k in transform.scale_numerators if latent * k % den]
    if not bad:
        return None
    k = bad[0]
    step = den // math.gcd(latent, den)
    return (f"transform.scale_numerators {bad} over {den} do not fit the {latent} px latent (data.image_size "
            f"{image_size} / f{factor}): at {k}/{den} the target image is {[image_size * k // den] * 2} px but the "
            f"decoded scaled latent is {[factor * (latent * k // den)] * 2} px ({latent} x {k}/{den} = "
            f"{latent * k / den:g} is not an integer); choose numerators that are multiples of {step} (scales "
            f"j/{den // step})")


def shape_problems(c: FinetuneConfig) -> list[str]:
    """Every transform the sampler can draw must give a target the decoder can produce and D can score.

    Checked before compiling, so that a bad image size / scale grid fails at start-up, not when a scale is
    first drawn hours in.
    """
    f, size = c.model.model_config().downsample_factor, c.data.image_size
    if size % f:
        return [f"data.image_size={size} is not divisible by the autoencoder's downsampling factor {f}"]
    problems = []
    if c.transform.p_equivariance > 0:
        problems += [p for p in [grid_problem(c.transform, size, f)] if p]
    for plan in all_plans(c.transform, (size, size)):
        if plan.branch is Branch.PLAIN:
            continue
        image = [resample.resized_size(size, n, plan.denominator) for n in plan.scale]
        if plan.branch is Branch.LOWRES and any(n % f for n in image):
            problems.append(f"transform {plan}: the low-res image {image} px is not divisible by {f}")
        if min(image) // 2 ** c.disc.n_layers - 2 < 1:
            problems.append(f"transform {plan}: a {min(image)} px target gives the {c.disc.n_layers}-layer "
                            "discriminator no logits")
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
