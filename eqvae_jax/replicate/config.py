"""Schema and checks of the replication chain (configs/replicate.py).

Every field describes one stage's size; the jobs' own schemas get configs derived from it (stages.py), and those
derived configs are parsed with the jobs' own `parse_config` at start-up, so a bad value of any stage ends the
command before anything is built. Both arms of every comparison get the same values: the only field that
differs between EQ and control is the EQ branch probability (`autoencoder.p_equivariance`,
`vq.p_equivariance`; the control's is 0).

Two families run by default: `kl` (KL autoencoder -> latent caches -> DiT/SiT) and `vq` (VQ autoencoder -> token
caches -> MaskGIT); both share the shapes classifier and the report. `kl=False` or `vq=False` runs one family.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from eqvae_jax.typed_config import ConfigError, default_config, parse_collect


@dataclasses.dataclass(frozen=True)
class AutoencoderSchedule:
    """What the KL and VQ autoencoder stages share (`jobs.autoencoder_schedule`): batch, learning rate,
    pretraining and fine-tuning lengths, the EQ arm's transforms, the discriminator's size (each family's section
    has its own values, with the same defaults)."""

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
class AutoencoderStage(AutoencoderSchedule):
    """The KL autoencoder: pretraining from random init (plain reconstruction), then the EQ and control fine-tunes."""

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # three levels: f4 (8x8 latents at 32 px)
    latent_channels: int = 4
    norm_groups: int = 16


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
class VQStage(AutoencoderSchedule):
    """The VQ autoencoder (taming's VQGAN architecture, small): pretraining from random init (plain
    reconstruction), then the EQ and control fine-tunes (EQ-VQGAN: the transform acts on the pre-quantization
    features). GroupNorm keeps taming's 32 groups so that every export is also a taming checkpoint."""

    base_channels: int = 32
    # four levels: f8, 4x4 tokens at 32 px: the SiT's sequence length (8x8 latents, patch 2), as the paper's
    # MaskGIT (f16, 16x16 tokens) and DiT/SiT (f8, 32x32 latents, patch 2) both see 256 positions
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    attn_resolutions: tuple[int, ...] = (4,)  # attention at the token grid, as taming's f16 at 256 px
    embed_dim: int = 16  # codebook vector size (= z_channels)
    n_embed: int = 128  # codebook size


@dataclasses.dataclass(frozen=True)
class TokenStage:
    """The token caches of both VQ arms (the extraction job, shapes train split with labels)."""

    train_images: int = 8192
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class MaskGITStage:
    """A small class-conditional MaskGIT per VQ arm and seed (valeoai v1's objective and decoding); sample metrics
    every `eval_every` updates, scored exactly as the DiT's (same classifier, reference images and sample count)."""

    depth: int = 4  # the SiT's depth and width
    hidden_dim: int = 96
    heads: int = 4
    mlp_dim: int = 384
    dropout: float = 0.1
    updates: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_updates: int = 100
    ema_decay: float = 0.0  # 0 = no EMA (v1 keeps none); else the decay of the EMA the samples come from
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 500
    num_samples: int = 512  # must equal dit.num_samples when both families run (one reference set)
    sampling_steps: int = 8
    cfg_scale: float = 0.0  # no guidance, as the DiT stage (v1's default is 3)
    sample_seed: int = 0  # the same decoding randomness for every arm, seed and checkpoint


@dataclasses.dataclass(frozen=True)
class ReplicateConfig:
    image_size: int = 32
    seed: int = 0  # autoencoder init, data order and transform draws (identical for both arms)
    shapes_seed: int = 0
    compile_workers: int = 0  # EQ-VAE job compile threads (0 = the host's cores)
    kl: bool = True  # the KL family: autoencoder -> latent caches -> DiT/SiT
    vq: bool = True  # the VQ family: VQ autoencoder -> token caches -> MaskGIT
    autoencoder: AutoencoderStage = AutoencoderStage()
    classifier: ClassifierStage = ClassifierStage()
    eval: EvalStage = EvalStage()
    latents: LatentStage = LatentStage()
    dit: DiTStage = DiTStage()
    vq_autoencoder: VQStage = VQStage()
    tokens: TokenStage = TokenStage()
    maskgit: MaskGITStage = MaskGITStage()


ARMS = ("eq", "control")


def defaults() -> ConfigDict:
    return default_config(ReplicateConfig)


def own_problems(c: ReplicateConfig) -> list[str]:
    """Checks the jobs' schemas cannot make (they see one stage at a time)."""
    problems = [] if c.kl or c.vq else ["kl and vq are both False: the chain would train nothing"]
    if c.eval.preview_images < 1 or c.eval.num_images < 2:
        problems.append("eval.preview_images >= 1 and eval.num_images >= 2")
    if c.eval.num_images > 0 and c.eval.id_images > c.eval.num_images:
        problems.append(f"eval.id_images={c.eval.id_images} > eval.num_images={c.eval.num_images}")
    if c.kl:
        problems += kl_problems(c)
    if c.vq:
        problems += vq_problems(c)
    return problems


def kl_problems(c: ReplicateConfig) -> list[str]:
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
    return problems


def vq_problems(c: ReplicateConfig) -> list[str]:
    problems = []
    v, m = c.vq_autoencoder, c.maskgit
    if not 0.0 < v.p_equivariance <= 1.0:
        problems.append(f"vq_autoencoder.p_equivariance={v.p_equivariance} must be in (0, 1] (the control has 0)")
    if v.pretrain_updates < 1 or v.finetune_updates < 1:
        problems.append("vq_autoencoder.pretrain_updates and vq_autoencoder.finetune_updates must be >= 1")
    if v.base_channels < 1 or v.base_channels % 32:
        problems.append(f"vq_autoencoder.base_channels={v.base_channels} must be a positive multiple of 32 "
                        "(taming's GroupNorm(32), which the taming export needs)")
    if len(m.seeds) < 1 or len(set(m.seeds)) != len(m.seeds):
        problems.append(f"maskgit.seeds={m.seeds} must be distinct and not empty")
    if m.eval_every < 1 or m.updates % m.eval_every:
        problems.append(f"maskgit.eval_every={m.eval_every} must divide maskgit.updates={m.updates}")
    if m.num_samples < 16:
        problems.append(f"maskgit.num_samples={m.num_samples}: at least 16 samples for the metrics")
    if c.kl and m.num_samples != c.dit.num_samples:
        problems.append(f"maskgit.num_samples={m.num_samples} must equal dit.num_samples={c.dit.num_samples}: both "
                        "families are scored against the same reference images")
    if not 0.0 <= m.ema_decay < 1.0:
        problems.append(f"maskgit.ema_decay={m.ema_decay} must be in [0, 1) (0 = no EMA)")
    return problems


def parse_config(config: ConfigDict) -> ReplicateConfig:
    """The typed config, or a ConfigError listing the chain's own problems (`chain.check` adds those of every
    stage's derived job config)."""
    c, problems = parse_collect(ReplicateConfig, config)
    problems += own_problems(c)
    if problems:
        raise ConfigError(problems)
    return c
