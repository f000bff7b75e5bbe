"""Schema and checks of the EQ-VAE fine-tuning job (`trainer = 'eqvae'`).

`EQVAEConfig` holds the reference recipe as defaults (zelaki/eqvae `eqvae_config.yaml` + `main.py`): two Adams
with betas (0.5, 0.9) at lr = accumulate(2) * batch(80) * 4.5e-6 = 7.2e-4, constant; 80 images per micro-step
(8 GPUs x 10) and 2 micro-steps per update; 54,470 updates (5 OpenImages epochs); GAN from update 0 (adaptive
weight x 0.5, one per 10 images as per GPU); KL 1e-6; LPIPS 1.0 with dropout on; the 0.5 / 0.125 / 0.375 branch
mix with scales k/32, k = 8..31; seed 23. `parse_config` turns a
ConfigDict into it and checks everything that can be checked before a model is built: every problem is
listed at once (unknown keys with suggestions, batch/mesh splits, weight paths, and every transform the
sampler can draw against the autoencoder's and discriminator's shapes).
"""

from __future__ import annotations

import dataclasses

import jax
from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.losses import resample
from eqvae_jax.losses.autoencoder import LossConfig
from eqvae_jax.losses.equivariance import Branch, TransformConfig, all_plans
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
    enabled: bool = False  # the reference has no EMA of the autoencoder
    decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic monitoring on held-out images (not the paper's 50K evaluation: see eqvae_jax.evaluate)."""

    every_updates: int = 1000
    batches: int = 8  # held-out batches for PSNR/SSIM/LPIPS/equivariance error (0 = no periodic eval)
    images: int = 8  # images in the reconstruction grid
    global_batch_size: int = 0  # 0 = the training global_batch_size


@dataclasses.dataclass(frozen=True)
class EQVAEConfig(RunConfig):
    trainer: str = "eqvae"
    seed: int = 23  # reference seed_everything(23)
    # The eq-vae release: 5 epochs of OpenImages (train, 1,743,042 images) at 160 images per update
    # = 5 * 10,894 = 54,470 updates (the paper rounds one epoch to ~10K updates).
    total_updates: int = 54_470
    pretrain_updates: int = 0  # plain-reconstruction updates before EQ fine-tuning (demo from random init)
    global_batch_size: int = 80  # per micro-step: 8 GPUs x 10 in the reference; x accumulate 2 = 160 per update
    checkpoint: CheckpointConfig = CheckpointConfig(every_updates=1000)
    log: LogConfig = LogConfig(every_updates=25)
    model: AutoencoderSpec = dataclasses.field(default_factory=AutoencoderSpec)
    disc: DiscConfig = DiscConfig()
    lpips: LpipsConfig = LpipsConfig()
    loss: LossConfig = LossConfig()
    transform: TransformConfig = TransformConfig()
    # 'redraw': the discriminator step draws its own transform and runs its own forward pass (reference);
    # 'shared': it reuses the generator step's (target, reconstruction) pair (one autoencoder forward fewer).
    d_step_transform: str = "redraw"
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    export_diffusers: bool = True  # write WORKDIR/export/diffusers at the end of training

    @property
    def learning_rate(self) -> float:
        o = self.optim
        return float(o.accumulate * self.global_batch_size * o.base_lr) if o.scale_lr else float(o.base_lr)

    @property
    def eval_batch_size(self) -> int:
        return self.eval.global_batch_size or self.global_batch_size


def defaults() -> ConfigDict:
    """The schema as a ConfigDict with the reference values (config files start here)."""
    return default_config(EQVAEConfig)


def disc_stats_groups(config: EQVAEConfig, batch_shards: int) -> int:
    """The discriminator's BatchNorm group count (see DiscConfig.stats_groups)."""
    if config.disc.stats_groups:
        return config.disc.stats_groups
    batch = config.global_batch_size
    return batch // 10 if batch % 10 == 0 else batch_shards


def parse_config(config: ConfigDict, num_devices: int | None = None) -> EQVAEConfig:
    """The typed config, or a ConfigError listing every problem (touches no device beyond counting them)."""
    parsed, problems = parse_collect(EQVAEConfig, config)
    problems += semantic_problems(parsed, jax.device_count() if num_devices is None else num_devices)
    if problems:
        raise ConfigError(problems)
    return parsed


def semantic_problems(c: EQVAEConfig, num_devices: int) -> list[str]:
    model_problems = c.model.problems("model")
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
        problems.append("optim.accumulate must be >= 1")
    if not 0 <= c.pretrain_updates <= c.total_updates:
        problems.append("need 0 <= pretrain_updates <= total_updates")
    if not model_problems:
        problems += shape_problems(c)
    return problems


def shape_problems(c: EQVAEConfig) -> list[str]:
    """Every transform the sampler can draw must give a target the decoder can produce and D can score.

    Checked before compiling, so that a bad image size / scale grid fails at start-up, not when a scale is
    first drawn hours in.
    """
    f, size = c.model.model_config().downsample_factor, c.data.image_size
    if size % f:
        return [f"data.image_size={size} is not divisible by the autoencoder's downsampling factor {f}"]
    problems = []
    for plan in all_plans(c.transform, (size, size)):
        if plan.branch is Branch.PLAIN:
            continue
        image = [resample.resized_size(size, n, plan.denominator) for n in plan.scale]
        latent = [resample.resized_size(size // f, n, plan.denominator) for n in plan.scale]
        if plan.branch is Branch.EQUIVARIANCE and image != [f * n for n in latent]:
            problems.append(f"transform {plan}: the target image is {image} px but the decoded scaled latent is "
                            f"{[f * n for n in latent]} px; choose scales with image_size/{f} * scale integral")
        if plan.branch is Branch.LOWRES and any(n % f for n in image):
            problems.append(f"transform {plan}: the low-res image {image} px is not divisible by {f}")
        if min(image) // 2 ** c.disc.n_layers - 2 < 1:
            problems.append(f"transform {plan}: a {min(image)} px target gives the {c.disc.n_layers}-layer "
                            "discriminator no logits")
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
