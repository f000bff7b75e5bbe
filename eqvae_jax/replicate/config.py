"""Schema and checks of the replication chain (configs/replicate.py).

Every field describes one stage's size; the jobs' own schemas get configs derived from it (stages.py), and those
derived configs are parsed with the jobs' own `parse_config` at start-up, so a bad value of any stage ends the
command before anything is built. Both arms of every comparison get the same values: the only field that
differs between EQ and control is `autoencoder.p_equivariance` (the control's is 0).
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from eqvae_jax.typed_config import ConfigError, default_config, parse_collect


@dataclasses.dataclass(frozen=True)
class AutoencoderStage:
    """The KL autoencoder: pretraining from random init (plain reconstruction), then the EQ and control fine-tunes."""

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # three levels: f4 (8x8 latents at 32 px)
    latent_channels: int = 4
    norm_groups: int = 16
    batch_size: int = 16
    learning_rate: float = 2e-4
    pretrain_updates: int = 600
    finetune_updates: int = 300
    p_equivariance: float = 0.5  # the EQ arm's branch probability (the control's is 0)
    scale_numerators: tuple[int, ...] = (8, 12)  # EQ scales k / scale_denominator
    scale_denominator: int = 16
    disc_channels: int = 16
    disc_layers: int = 2
    checkpoint_every: int = 100


@dataclasses.dataclass(frozen=True)
class ClassifierStage:
    """The shapes classifier whose features give shapes-rFID and the sample metrics (eval/shapes_metric.py)."""

    steps: int = 1500
    batch_size: int = 128
    train_images: int = 16384
    eval_images: int = 2000
    channels: tuple[int, ...] = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class EvalStage:
    """eval_vae on both arms (held-out shapes) plus the latent spectrum."""

    num_images: int = 1000  # held-out images (PSNR, SSIM, shapes-rFID, equivariance error)
    id_images: int = 1000  # latents for TwoNN
    batch_size: int = 50
    hf_cutoff: float = 0.5  # high-frequency energy above this fraction of Nyquist (eval/spectrum.py)
    preview_images: int = 6  # images in latents.png


@dataclasses.dataclass(frozen=True)
class LatentStage:
    """The latent caches of both arms (the extraction job, shapes train split with labels)."""

    train_images: int = 8192
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class DiTStage:
    """A small class-conditional DiT/SiT per arm and seed; sample metrics every `eval_every` updates."""

    objective: str = "sit"
    depth: int = 4
    hidden_size: int = 96
    num_heads: int = 4
    patch: int = 2
    updates: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    ema_decay: float = 0.999
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 500
    num_samples: int = 512  # class-conditional samples per evaluation (labels i % 8), against as many held-out
    sampler: str = "ode"
    sampling_steps: int = 20
    sample_seed: int = 0  # the same noise for every arm, seed and checkpoint


@dataclasses.dataclass(frozen=True)
class ReplicateConfig:
    image_size: int = 32
    seed: int = 0  # autoencoder init, data order and transform draws (identical for both arms)
    shapes_seed: int = 0
    compile_workers: int = 0  # EQ-VAE job compile threads (0 = the host's cores)
    autoencoder: AutoencoderStage = AutoencoderStage()
    classifier: ClassifierStage = ClassifierStage()
    eval: EvalStage = EvalStage()
    latents: LatentStage = LatentStage()
    dit: DiTStage = DiTStage()


ARMS = ("eq", "control")


def defaults() -> ConfigDict:
    return default_config(ReplicateConfig)


def own_problems(c: ReplicateConfig) -> list[str]:
    """Checks the jobs' schemas cannot make (they see one stage at a time)."""
    problems = []
    a, d = c.autoencoder, c.dit
    if not 0.0 < a.p_equivariance <= 1.0:
        problems.append(f"autoencoder.p_equivariance={a.p_equivariance} must be in (0, 1] (the control has 0)")
    if a.pretrain_updates < 1 or a.finetune_updates < 1:
        problems.append("autoencoder.pretrain_updates and autoencoder.finetune_updates must be >= 1")
    if len(d.seeds) < 1 or len(set(d.seeds)) != len(d.seeds):
        problems.append(f"dit.seeds={d.seeds} must be distinct and not empty")
    if d.eval_every < 1 or d.updates % d.eval_every:
        problems.append(f"dit.eval_every={d.eval_every} must divide dit.updates={d.updates}")
    if d.num_samples < 16:
        problems.append(f"dit.num_samples={d.num_samples}: at least 16 samples for the metrics")
    if c.eval.preview_images < 1 or c.eval.num_images < 2:
        problems.append("eval.preview_images >= 1 and eval.num_images >= 2")
    if c.eval.num_images > 0 and c.eval.id_images > c.eval.num_images:
        problems.append(f"eval.id_images={c.eval.id_images} > eval.num_images={c.eval.num_images}")
    return problems


def parse_config(config: ConfigDict) -> ReplicateConfig:
    """The typed config, or a ConfigError listing the chain's own problems (`chain.check` adds those of every
    stage's derived job config)."""
    c, problems = parse_collect(ReplicateConfig, config)
    problems += own_problems(c)
    if problems:
        raise ConfigError(problems)
    return c
