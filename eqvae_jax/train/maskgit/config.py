"""Schema and checks of the MaskGIT training job on a token cache (`trainer = 'maskgit'`).

Defaults are valeoai/Maskgit-pytorch v1 (commit 5ce6c9e), the reproduction EQ-VAE trains its MaskGIT with: the
"base" transformer (24 layers, width 768, 16 heads, MLP 3072, dropout 0.1, class token appended last); arccos
masking with a per-token Bernoulli draw, cross-entropy with label smoothing 0.1 over all tokens, 10% label drop;
AdamW lr 1e-4, betas (0.9, 0.96), weight decay 1e-5 on every parameter, linear warm-up from 0 over 2,500 updates
then constant, gradient clipping at global norm 1.0; bf16 matmuls (v1: fp16 autocast); no EMA. Global batch 512
(v1's README: 8 GPUs x 64, 755,200 iterations; the EQ-VAE paper says batch 256) for 300 epochs of ImageNet:
300 x floor(1,281,167 / 512) = 750,600 updates. Sampling: 8 steps, arccos reveal schedule, softmax temperature 1,
Gumbel temperature 4.5 * (1 - i / (T - 1)), CFG w = 3 ramped linearly. The options of Chang et al.'s MaskGIT
(cosine schedule, loss on masked tokens, class token first) are config values.

The codebook size and token grid come from the cache (meta `codebook_size`, `token_shape`): the model's preset
values for them are replaced, so a tiny cache trains a tiny model without overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from eqvae_jax.data.latent_cache import META_FILE, LatentReadConfig, content, read_meta
from eqvae_jax.maskgit.loss import LOSS_ON, Objective
from eqvae_jax.maskgit.masking import SCHEDULES
from eqvae_jax.maskgit.sampling import RANDOMIZE, REVEAL_SCHEDULES, reveal_schedule
from eqvae_jax.models import maskgit
from eqvae_jax.train.config import CheckpointConfig, LogConfig, MeshConfig, RunConfig, run_problems
from eqvae_jax.typed_config import ConfigError, default_config, parse_collect

COMPUTE_DTYPES = ("float32", "bfloat16")
CLASS_LABELS = ("random", "cycle")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str = "base"  # models.maskgit.PRESETS: base (the paper's), big, huge, tiny
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # MaskGITConfig fields (e.g. depth)
    num_classes: int = 1000
    dropout: float = 0.1
    class_token_first: bool = False  # v1 appends it (257th position); True is google-research/maskgit's layout
    compute_dtype: str = "bfloat16"  # matmuls in bf16, LayerNorm/softmax/residual/logits in f32 (v1: fp16)
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    schedule: str = "arccos"  # masking ratio p = schedule(r), r ~ U(0, 1); Chang et al.: cosine
    label_drop: float = 0.1  # labels replaced by the dropped-label token (classifier-free guidance)
    label_smoothing: float = 0.1
    loss_on: str = "all"  # v1: every token; 'masked': the masked tokens only (Chang et al.)

    def objective(self) -> Objective:
        return Objective(self.schedule, self.label_drop, self.label_smoothing, self.loss_on)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.96
    eps: float = 1e-8
    weight_decay: float = 1e-5  # AdamW's decoupled decay, on every parameter as v1's single param group
    warmup_updates: int = 2500  # lr * update / warmup_updates from 0, then constant (0 = no warm-up)
    grad_clip: float = 1.0  # global norm; 0 = none


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    enabled: bool = False  # v1 keeps no EMA; on: decay * ema + (1 - decay) * params after every update
    decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class TokensConfig(LatentReadConfig):
    """The token cache (python -m eqvae_jax.main --config=configs/extract_tokens.py) and how it is read."""


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Decoding settings (`python -m eqvae_jax.sample` reads them too) and the periodic sample grid."""

    steps: int = 8
    schedule: str = "arccos"  # tokens revealed per step (v1 adap_sche)
    sm_temp: float = 1.0  # logits are multiplied by it before the softmax (v1)
    r_temp: float = 4.5  # Gumbel noise on the confidences, scaled by r_temp * (1 - step / (steps - 1))
    randomize: str = "linear"
    cfg_scale: float = 3.0  # w, ramped linearly from 0 at the first step to w at the last; 0 = no guidance
    seed: int = 0
    use_ema: bool = True  # sample from the EMA weights when the run keeps them
    vae: str = ""  # '' = the VQ model recorded in the token cache; else a VQ weights dir to decode with
    grid_every_updates: int = 0  # 0 = no periodic sample grid
    grid_count: int = 16


@dataclasses.dataclass(frozen=True)
class MaskGITJobConfig(RunConfig):
    trainer: str = "maskgit"
    seed: int = 0
    total_updates: int = 750_600  # 300 epochs of ImageNet at batch 512
    global_batch_size: int = 512
    mesh: MeshConfig = MeshConfig(data=0, fsdp=-1)  # FSDP inside a slice, data parallel across slices
    fsdp_min_size: int = 2**14  # tensors with fewer elements stay replicated
    checkpoint: CheckpointConfig = CheckpointConfig(every_updates=10_000)
    log: LogConfig = LogConfig(every_updates=100)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    tokens: TokensConfig = TokensConfig()
    sample: SampleConfig = SampleConfig()

    def maskgit_config(self, codebook_size: int, grid_size: int) -> maskgit.MaskGITConfig:
        """The transformer for a token cache of `codebook_size` codes on a grid_size x grid_size grid."""
        m = self.model
        fields = {"num_classes": m.num_classes, "dropout": m.dropout, "class_token_first": m.class_token_first,
                  "compute_dtype": m.compute_dtype, "remat": m.remat, **m.overrides,
                  "codebook_size": codebook_size, "grid_size": grid_size}
        return maskgit.PRESETS[m.preset](**fields)


def defaults() -> ConfigDict:
    return default_config(MaskGITJobConfig)


def cache_problems(c: MaskGITJobConfig) -> list[str]:
    """What is wrong with the token cache for this config (reads its meta)."""
    path = c.tokens.cache_dir
    if not path:
        return ["tokens.cache_dir is empty: extract tokens first (configs/extract_tokens.py)"]
    if not epath.Path(path, META_FILE).is_file():  # local or gs://
        return [f"tokens.cache_dir={path!r} is not a token cache (no {META_FILE})"]
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return [f"tokens.cache_dir: {e}"]
    if content(meta) != "tokens":
        return [f"tokens.cache_dir={path!r} holds {content(meta)} (a latent cache for DiT), not tokens: extract a "
                "token cache with a VQ autoencoder (configs/extract_tokens.py)"]
    h, w = meta["token_shape"]
    if h != w:
        return [f"tokens.cache_dir: MaskGIT needs a square token grid, the cache's is {h}x{w}"]
    return []


def _model_problems(c: MaskGITJobConfig) -> list[str]:
    m = c.model
    if m.preset not in maskgit.PRESETS:
        return [f"model.preset {m.preset!r} is not one of {sorted(maskgit.PRESETS)}"]
    problems = []
    if m.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"model.compute_dtype must be one of {COMPUTE_DTYPES}, not {m.compute_dtype!r}")
    if m.num_classes < 1:
        problems.append("model.num_classes must be >= 1")
    try:
        c.maskgit_config(1024, 16)
    except (TypeError, ValueError) as e:
        problems.append(f"model: {e}")
    return problems


def _sample_problems(s: SampleConfig) -> list[str]:
    problems = []
    if s.schedule not in REVEAL_SCHEDULES:
        problems.append(f"sample.schedule must be one of {REVEAL_SCHEDULES}, not {s.schedule!r}")
    else:
        try:
            reveal_schedule(s.steps, 256, s.schedule)
        except ValueError as e:
            problems.append(f"sample.steps: {e}")
    if s.randomize not in RANDOMIZE:
        problems.append(f"sample.randomize must be one of {RANDOMIZE}, not {s.randomize!r}")
    if s.grid_every_updates < 0 or s.grid_count < 1:
        problems.append("sample.grid_every_updates must be >= 0 and sample.grid_count >= 1")
    return problems


def parse_config(config: ConfigDict, num_devices: int | None = None, check_cache: bool = True) -> MaskGITJobConfig:
    """The typed config, or a ConfigError listing every problem. `check_cache=False` skips reading the token
    cache (sampling a finished run, ahead-of-time compiles)."""
    c, problems = parse_collect(MaskGITJobConfig, config)
    problems += run_problems(c, jax.device_count() if num_devices is None else num_devices,
                             len({getattr(d, "slice_index", 0) for d in jax.devices()}))
    problems += _model_problems(c)
    o = c.objective
    if o.schedule not in SCHEDULES:
        problems.append(f"objective.schedule must be one of {SCHEDULES}, not {o.schedule!r}")
    if o.loss_on not in LOSS_ON:
        problems.append(f"objective.loss_on must be one of {LOSS_ON}, not {o.loss_on!r}")
    if not (0.0 <= o.label_drop <= 1.0 and 0.0 <= o.label_smoothing < 1.0):
        problems.append("objective.label_drop must be in [0, 1] and objective.label_smoothing in [0, 1)")
    if c.optim.lr <= 0 or c.optim.warmup_updates < 0 or c.optim.grad_clip < 0:
        problems.append("optim.lr must be > 0, optim.warmup_updates and optim.grad_clip >= 0")
    if not 0.0 <= c.ema.decay < 1.0:
        problems.append("ema.decay must be in [0, 1)")
    problems += _sample_problems(c.sample)
    if c.sample.cfg_scale != 0 and c.objective.label_drop <= 0:
        problems.append("sample.cfg_scale != 0 needs a model trained with label drop (objective.label_drop > 0)")
    if check_cache:
        problems += cache_problems(c)
    if problems:
        raise ConfigError(problems)
    return c
