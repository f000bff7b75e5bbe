"""Schema and checks of the DiT / SiT training job on a latent cache (`trainer = 'dit'`).

Defaults are the DiT / fast-DiT recipe the EQ-VAE paper trains with: AdamW lr 1e-4, wd 0, betas (0.9, 0.999),
constant LR, no clipping, global batch 256, EMA 0.9999 every step (initialised as a copy), 10% label dropout,
1000 classes, learned sigma, 400K updates. `objective='ddpm'` is DiT (1000-step linear schedule, eps
prediction, MSE + VB); 'sit' is SiT (linear interpolant, velocity prediction). FSDP over the devices of a
slice, data parallel across slices.

`repa` (SiT only) adds REPA (Yu et al., ICLR 2025; sihyun-yu/REPA): the tokens after block `encoder_depth`
go through a projector MLP and are aligned (negative cosine, weight `proj_coeff`) with a frozen DINOv2's
patch tokens of the uint8 crop each latent was encoded from, so the latent cache must store its crops
(extraction `store_images`). The teacher runs on the fly every step (DINOv2-B/14: 46.3 GFLOP per image, +6.4%
on SiT-XL/2's 724 with the projector; +0.3 GiB per chip on v5p-8) rather than from stored features: 256x768 bf16
features would be 393,216 B per image against 196,608 B for the crop, twice the storage and host-to-device
traffic, and tied to one teacher and resolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from eqvae_jax.data.latent_cache import META_FILE, LatentReadConfig, read_meta
from eqvae_jax.diffusion.guidance import FULL_INTERVAL
from eqvae_jax.eval.adm_metrics import BadInputError, NpzImages, read_statistics
from eqvae_jax.eval.inception import KIND as INCEPTION_KIND
from eqvae_jax.eval.inception import InceptionConfig
from eqvae_jax.models import dinov2, weights
from eqvae_jax.models.dit import PATCHES, SIZES, DiTConfig, dit_config
from eqvae_jax.parallel.mesh import mesh_shape, slice_count
from eqvae_jax.train.config import (
    CheckpointConfig,
    LogConfig,
    MeshConfig,
    RunConfig,
    run_problems,
    weights_dir_problem,
)
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect

OBJECTIVES = ("ddpm", "sit")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "sit": ("ode", "sde")}
COMPUTE_DTYPES = ("float32", "bfloat16")
TEACHER_SHARDINGS = ("replicated", "fsdp")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    size: str = "XL"  # 'S', 'B', 'L', 'XL'
    patch: int = 2
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # DiTConfig fields (tiny: depth, width)
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True  # SiT keeps the 8-channel head and ignores the sigma half, as the reference
    compute_dtype: str = "bfloat16"  # matmuls in bf16, LN/softmax/residual in f32 (reference: fp16 autocast)
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000  # ddpm
    rescale_vb: bool = False  # ddpm: loss_type RESCALED_MSE


@dataclasses.dataclass(frozen=True)
class LatentsConfig(LatentReadConfig):
    """The latent cache (python -m eqvae_jax.main --config=configs/extract_latents.py) and how it is used."""

    sample_posterior: bool = True  # z = mean + std * eps every step; False: z = mean
    scaling_factor: float = 0.0  # 0 = the cache's (the VAE's: 0.18215 for SD-VAE / EQ-VAE)
    shift_factor: float | None = None  # None = the cache's


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW at a constant learning rate (DiT / fast-DiT)."""

    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = none (DiT); REPA/SiT-REPA use 1.0


@dataclasses.dataclass(frozen=True)
class RepaConfig:
    """REPA's alignment loss (sihyun-yu/REPA train.py defaults); off unless `enabled`."""

    enabled: bool = False
    teacher: str = ""  # a DINOv2 weights dir (python -m eqvae_jax.convert --kind dinov2), or 'random' (tests)
    teacher_preset: str = "vitb14"  # teacher='random': a models.dinov2 preset (REPA: dinov2-vit-b)
    teacher_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # teacher='random': config fields
    teacher_dtype: str = "bfloat16"  # teacher matmuls (REPA runs it under fp16 autocast); weights stay float32
    teacher_sharding: str = "replicated"  # or 'fsdp': shard the frozen weights like the model's (large teachers)
    z_dim: int = 768  # the teacher's feature size (checked against it): the projector's output
    projector_dim: int = 2048
    encoder_depth: int = 8  # align the tokens after this many blocks
    proj_coeff: float = 0.5  # loss = denoising + proj_coeff * projection loss


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling settings (`python -m eqvae_jax.sample` reads them too) and the periodic sample grid."""

    sampler: str = ""  # '' = 'ddpm' for DiT, 'sde' for SiT; also 'ddim' (DiT), 'ode' (SiT)
    num_steps: int = 250
    cfg_scale: float = 1.0  # the EQ-VAE README evaluates without guidance
    guide_channels: int = 0  # 0 = all latent channels; 3 reproduces the reference DiT/SiT quirk
    # Guidance interval (SiT samplers 'ode'/'sde' only; REPA's --guidance-low/--guidance-high): with cfg_scale != 1,
    # guide only the steps that start at a noise level tau in [low, high], in REPA's time (1 = noise, 0 = data;
    # this SiT's t is 1 - tau); the other steps run the conditional model alone. (0, 1) = every step.
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    ode_method: str = "heun"
    seed: int = 0
    vae: str = ""  # '' = the VAE recorded in the latent cache; else a weights dir to decode with
    grid_every_updates: int = 0  # 0 = no periodic sample grid
    grid_count: int = 16
    grid_steps: int = 50
    # gFID monitoring: every N updates and at the end of training (0 = off), ADM's FID, sFID, IS, precision and
    # recall of `fid_num_samples` EMA samples (the settings above, random labels: what `python -m
    # eqvae_jax.sample` draws with the same seed) against `fid_reference`, logged as eval/fid etc.
    fid_every_updates: int = 0
    fid_num_samples: int = 10_000
    fid_reference: str = ""  # an ADM batch (.npz arr_0 [+ mu/sigma/mu_s/sigma_s]): VIRTUAL_imagenet256_labeled.npz
    inception: str = ""  # FID Inception weights dir (python -m eqvae_jax.convert --kind inception)
    fid_batch_size: int = 0  # global samples per sampling call; 0 = 32 per device


@dataclasses.dataclass(frozen=True)
class DiTJobConfig(RunConfig):
    trainer: str = "dit"
    seed: int = 0
    total_updates: int = 400_000  # the paper's 400K iterations
    global_batch_size: int = 256
    objective: str = "ddpm"
    mesh: MeshConfig = MeshConfig(data=0, fsdp=-1)  # FSDP inside a slice, data parallel across slices
    fsdp_min_size: int = 2**14  # tensors with fewer elements stay replicated
    checkpoint: CheckpointConfig = CheckpointConfig(every_updates=50_000)
    log: LogConfig = LogConfig(every_updates=100)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = DiffusionConfig()
    latents: LatentsConfig = LatentsConfig()
    optim: OptimConfig = OptimConfig()
    ema_decay: float = 0.9999  # every update, initialised as a copy of the weights
    repa: RepaConfig = dataclasses.field(default_factory=RepaConfig)
    sample: SampleConfig = SampleConfig()

    @property
    def sampler(self) -> str:
        return self.sample.sampler or ("ddpm" if self.objective == "ddpm" else "sde")

    @property
    def guidance_interval(self) -> tuple[float, float]:
        """(sample.guidance_low, sample.guidance_high): REPA's guidance interval."""
        return (self.sample.guidance_low, self.sample.guidance_high)

    def dit_config(self, latent_shape: tuple[int, int, int]) -> DiTConfig:
        """The backbone for latents of shape (h, w, c)."""
        m = self.model
        base = dit_config(m.size, m.patch, input_size=latent_shape[0], in_channels=latent_shape[2],
                          num_classes=m.num_classes, class_dropout_prob=m.class_dropout_prob,
                          learn_sigma=m.learn_sigma, compute_dtype=m.compute_dtype, remat=m.remat)
        if self.repa.enabled:
            base = dataclasses.replace(base, z_dim=self.repa.z_dim, projector_dim=self.repa.projector_dim)
        return dataclasses.replace(base, **m.overrides)

    def teacher_config(self) -> dinov2.DINOv2Config:
        """The REPA teacher's architecture (from its weights dir's config.json, or the random preset)."""
        r = self.repa
        if r.teacher == "random":
            cfg = dinov2.preset(r.teacher_preset, **r.teacher_overrides)
        else:
            kind, raw = weights.read_config(r.teacher)
            if kind != dinov2.KIND:
                raise ValueError(f"repa.teacher={r.teacher!r} holds a {kind!r} model, not {dinov2.KIND!r}")
            cfg = dinov2.DINOv2Config.from_dict(raw)
        return dataclasses.replace(cfg, compute_dtype=r.teacher_dtype)


def defaults() -> ConfigDict:
    return default_config(DiTJobConfig)


def _repa_problems(c: DiTJobConfig, check_files: bool) -> list[str]:
    r = c.repa
    problems = []
    if c.objective != "sit":
        problems.append(f"repa.enabled needs objective='sit' (REPA trains SiT), not {c.objective!r}")
    try:
        depth = c.dit_config((32, 32, 4)).depth
        if not 1 <= r.encoder_depth <= depth:
            problems.append(f"repa.encoder_depth={r.encoder_depth} must be in [1, {depth}] (the model's depth)")
    except (TypeError, ValueError):
        pass  # reported by the model checks
    if r.z_dim < 1 or r.projector_dim < 1:
        problems.append("repa.z_dim and repa.projector_dim must be >= 1")
    if r.proj_coeff < 0:
        problems.append("repa.proj_coeff must be >= 0")
    if r.teacher_sharding not in TEACHER_SHARDINGS:
        problems.append(f"repa.teacher_sharding must be one of {TEACHER_SHARDINGS}, not {r.teacher_sharding!r}")
    if r.teacher_dtype not in COMPUTE_DTYPES:
        return problems + [f"repa.teacher_dtype must be one of {COMPUTE_DTYPES}, not {r.teacher_dtype!r}"]
    if r.teacher == "random":
        if r.teacher_preset not in dinov2.PRESETS:
            problems.append(f"repa.teacher_preset {r.teacher_preset!r} is not one of {sorted(dinov2.PRESETS)}")
            return problems
    elif not check_files:
        return problems
    else:
        problem = weights_dir_problem("repa.teacher", r.teacher)
        if problem:
            return problems + [problem + " (or 'random' for a randomly initialised teacher)"]
    try:
        teacher = c.teacher_config()
    except (TypeError, ValueError) as e:
        return problems + [f"repa.teacher: {e}"]
    if teacher.hidden_size != r.z_dim:
        problems.append(f"repa.z_dim={r.z_dim} differs from the teacher's feature size {teacher.hidden_size}")
    return problems


def _cache_problems(c: DiTJobConfig) -> list[str]:
    if not c.latents.cache_dir:
        return ["latents.cache_dir is empty: extract latents first (configs/extract_latents.py)"]
    if not epath.Path(c.latents.cache_dir, META_FILE).is_file():  # local or gs://
        return [f"latents.cache_dir={c.latents.cache_dir!r} is not a latent cache (no {META_FILE})"]
    if c.repa.enabled:
        try:
            meta = read_meta(c.latents.cache_dir)
        except (OSError, ValueError) as e:
            return [f"latents.cache_dir: {e}"]
        if not meta.get("store_images", False):
            return [f"latents.cache_dir={c.latents.cache_dir!r} stores no images, and REPA's teacher needs the crop "
                    "of every latent: extract the cache with --config.store_images=True "
                    "(configs/extract_latents.py:images)"]
    return []


def _fid_problems(c: DiTJobConfig, num_devices: int, check_files: bool) -> list[str]:
    """gFID monitoring: counts, batch split, and (reading files) the Inception dir and the reference batch."""
    s = c.sample
    problems = []
    if s.fid_every_updates < 0:
        problems.append("sample.fid_every_updates must be >= 0 (0 = no gFID monitoring)")
    if not s.fid_every_updates:
        return problems
    if s.fid_num_samples < 1:
        problems.append("sample.fid_num_samples must be >= 1")
    try:
        shards = math.prod(mesh_shape(num_devices, c.mesh.data, c.mesh.fsdp, slice_count()))
        if s.fid_batch_size < 0 or s.fid_batch_size % shards:
            problems.append(f"sample.fid_batch_size={s.fid_batch_size} is not a multiple of the {shards} batch "
                            "shards (0 = 32 per device)")
    except ValueError:
        pass  # reported by run_problems
    if not check_files:
        return problems
    cfg = None
    if not s.inception:
        problems.append("sample.inception is empty: gFID monitoring needs the FID Inception (python -m "
                        "eqvae_jax.convert --kind inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR)")
    else:
        try:
            kind, raw = weights.read_config(s.inception)
            if kind != INCEPTION_KIND:
                problems.append(f"sample.inception={s.inception!r} holds a {kind!r} model, not {INCEPTION_KIND!r}")
            else:
                cfg = InceptionConfig.from_dict(raw)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"sample.inception={s.inception!r}: {e}")
    if not s.fid_reference:
        problems.append("sample.fid_reference is empty: give an ADM reference batch (.npz), e.g. "
                        "VIRTUAL_imagenet256_labeled.npz, or one written by "
                        "python -m eqvae_jax.eval_samples --write_ref")
        return problems
    try:
        NpzImages(s.fid_reference)
        stats = read_statistics(s.fid_reference)
    except (BadInputError, OSError, ValueError) as e:
        return problems + [f"sample.fid_reference: {e}"]
    if cfg is not None and stats is not None:
        dims = (len(stats[0].mu), len(stats[1].mu))
        if dims != (cfg.pool_features, cfg.spatial_features):
            problems.append(f"sample.fid_reference carries statistics of {dims[0]}/{dims[1]}-dimensional features, "
                            f"but sample.inception gives {cfg.pool_features}/{cfg.spatial_features} (a reference made "
                            "with another Inception)")
    return problems


def guidance_problems(sampler: str, interval: tuple[float, float], prefix: str = "") -> list[str]:
    """The guidance interval must be a sub-interval of [0, 1] and, unless it is all of it, meet a SiT sampler."""
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        return [f"{prefix}guidance_low/high = ({low}, {high}): need 0 <= low <= high <= 1 (REPA's time: 1 = noise)"]
    if (low, high) != FULL_INTERVAL and sampler not in SAMPLERS["sit"]:
        return [f"{prefix}guidance_low/high = ({low}, {high}): a guidance interval needs a SiT sampler "
                f"{SAMPLERS['sit']} (REPA's samplers), not {sampler!r}"]
    return []


def parse_config(config: ConfigDict, num_devices: int | None = None, check_cache: bool = True) -> DiTJobConfig:
    """The typed config, or a ConfigError listing every problem. `check_cache=False` skips the checks that read
    files (the latent cache, the REPA teacher's weights dir, the gFID Inception and reference), e.g. to sample
    from a finished run."""
    c, problems = parse_collect(DiTJobConfig, config)
    devices = jax.device_count() if num_devices is None else num_devices
    problems += run_problems(c, devices, len({getattr(d, "slice_index", 0) for d in jax.devices()}))
    if c.objective not in OBJECTIVES:
        problems.append(f"objective must be one of {OBJECTIVES}, not {c.objective!r}")
    elif c.sampler not in SAMPLERS[c.objective]:
        problems.append(f"sample.sampler {c.sample.sampler!r} does not fit objective {c.objective!r} "
                        f"(use one of {SAMPLERS[c.objective]})")
    problems += guidance_problems(c.sampler, c.guidance_interval, "sample.")
    if c.model.size not in SIZES or c.model.patch not in PATCHES:
        problems.append(f"model size/patch {c.model.size}/{c.model.patch} unknown (sizes {sorted(SIZES)}, "
                        f"patches {PATCHES})")
    if c.model.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"model.compute_dtype must be 'float32' or 'bfloat16', not {c.model.compute_dtype!r}")
    if not 0.0 <= c.ema_decay < 1.0:
        problems.append("ema_decay must be in [0, 1)")
    if c.repa.enabled:
        problems += _repa_problems(c, check_cache)
    if check_cache:
        problems += _cache_problems(c)
    problems += _fid_problems(c, devices, check_cache)
    if problems:
        raise ConfigError(problems)
    return c
