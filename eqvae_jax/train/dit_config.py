"""Defaults and validation of the DiT / SiT training job on a latent cache (`trainer = 'dit'`).

The defaults are the reference recipe (recipe.md §5): AdamW lr 1e-4, wd 0, betas (0.9, 0.999), constant LR,
no clipping, global batch 256, EMA 0.9999 every step (initialised as a copy), 10% label dropout, 1000 classes,
learned sigma. `objective='ddpm'` is DiT (1000-step linear schedule, eps prediction, MSE + VB); 'sit' is SiT
(linear interpolant, velocity prediction). `validate()` runs before anything is built or compiled.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from eqvae_jax.train.eqvae_config import ConfigError, unknown_keys

OBJECTIVES = ("ddpm", "sit")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "sit": ("ode", "sde")}


def defaults() -> ConfigDict:
    c = ConfigDict()
    c.trainer = "dit"
    c.seed = 0
    c.total_steps = 400_000  # the paper's 400K iterations
    c.objective = "ddpm"

    # Default FSDP over 'fsdp' inside a slice, data parallel across slices: data = 0 means the slice count.
    c.mesh = ConfigDict({"data": 0, "fsdp": -1})
    c.fsdp_min_size = 2**14  # tensors with fewer elements stay replicated

    # Backbone (DiTConfig fields). input_size / in_channels come from the cache's latent shape.
    c.model = ConfigDict()
    c.model.size = "XL"  # 'S', 'B', 'L', 'XL'
    c.model.patch = 2
    c.model.overrides = ConfigDict()  # DiTConfig field overrides (tiny models: depth, hidden_size, num_heads)
    c.model.num_classes = 1000
    c.model.class_dropout_prob = 0.1
    c.model.learn_sigma = True  # SiT keeps the 8-channel head and ignores the sigma half, as the reference
    c.model.compute_dtype = "bfloat16"  # matmuls in bf16, LN/softmax/residual in f32 (reference: fp16 autocast)
    c.model.remat = False

    c.diffusion = ConfigDict()
    c.diffusion.num_timesteps = 1000  # ddpm
    c.diffusion.rescale_vb = False  # ddpm: loss_type RESCALED_MSE

    # Latent cache (python -m eqvae_jax.main --config=configs/extract_latents.py).
    c.latents = ConfigDict()
    c.latents.cache_dir = ""
    c.latents.sample_posterior = True  # z = mean + std * eps every step; False: z = mean
    c.latents.scaling_factor = 0.0  # 0 = the cache's (the VAE's: 0.18215 for SD-VAE / EQ-VAE)
    c.latents.shift_factor = config_dict.placeholder(float)  # None = the cache's
    c.latents.shuffle = True
    c.latents.seed = 0
    c.latents.read_threads = 4
    c.latents.worker_count = 0  # decoding a record is a memcpy: threads are enough
    c.latents.prefetch = 2

    c.global_batch_size = 256

    c.optim = ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0  # 0 = none (DiT); REPA/SiT-REPA use 1.0

    c.ema_decay = 0.9999

    # Sampling defaults (periodic grids here; `python -m eqvae_jax.sample` reads them too).
    c.sample = ConfigDict()
    c.sample.sampler = ""  # '' = 'ddpm' for DiT, 'sde' for SiT; also 'ddim' (DiT), 'ode' (SiT)
    c.sample.num_steps = 250
    c.sample.cfg_scale = 1.0  # the EQ-VAE README evaluates without guidance
    c.sample.guide_channels = 0  # 0 = all latent channels; 3 reproduces the reference DiT/SiT quirk
    c.sample.ode_method = "heun"
    c.sample.seed = 0
    c.sample.vae = ""  # '' = the VAE recorded in the latent cache

    c.checkpoint = ConfigDict({"every_steps": 50_000, "max_to_keep": 3, "keep_every": 0, "async_save": True})
    c.log = ConfigDict()
    c.log.every_steps = 100
    c.log.sample_every_steps = 0  # 0 = no periodic sample grid
    c.log.sample_count = 16
    c.log.sample_steps = 50
    c.max_consecutive_nonfinite = 20
    c.compilation_cache_dir = ""  # '' = WORKDIR/jax_cache
    return c


def sampler_name(config: ConfigDict) -> str:
    return config.sample.sampler or ("ddpm" if config.objective == "ddpm" else "sde")


def validate(config: ConfigDict, num_devices: int | None = None, check_cache: bool = True) -> None:
    """Raise ConfigError listing every problem found; cheap, touches no device beyond counting them."""
    import os

    import jax

    from eqvae_jax.models.dit import PATCHES, SIZES
    from eqvae_jax.parallel.mesh import mesh_shape

    problems = unknown_keys(config.to_dict(), defaults().to_dict())  # plain dicts: nested keys too
    num_devices = jax.device_count() if num_devices is None else num_devices
    try:
        data, fsdp = mesh_shape(num_devices, resolve_data_axis(config.mesh.data), config.mesh.fsdp)
        if config.global_batch_size % (data * fsdp):
            problems.append(f"global_batch_size={config.global_batch_size} is not divisible by the "
                            f"{data * fsdp} batch shards (mesh data={data} x fsdp={fsdp})")
    except ValueError as e:
        problems.append(str(e))
    if config.objective not in OBJECTIVES:
        problems.append(f"objective must be one of {OBJECTIVES}, not {config.objective!r}")
    elif sampler_name(config) not in SAMPLERS[config.objective]:
        problems.append(f"sample.sampler {config.sample.sampler!r} does not fit objective "
                        f"{config.objective!r} (use one of {SAMPLERS[config.objective]})")
    if config.model.size not in SIZES or config.model.patch not in PATCHES:
        problems.append(f"model size/patch {config.model.size}/{config.model.patch} unknown "
                        f"(sizes {sorted(SIZES)}, patches {PATCHES})")
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        problems.append(f"model.compute_dtype must be 'float32' or 'bfloat16', not {config.model.compute_dtype!r}")
    if not 0.0 <= config.ema_decay < 1.0:
        problems.append("ema_decay must be in [0, 1)")
    if config.total_steps < 1:
        problems.append("total_steps must be >= 1")
    if check_cache:
        if not config.latents.cache_dir:
            problems.append("latents.cache_dir is empty: extract latents first (configs/extract_latents.py)")
        elif not os.path.isfile(os.path.join(config.latents.cache_dir, "meta.json")):
            problems.append(f"latents.cache_dir={config.latents.cache_dir!r} is not a latent cache (no meta.json)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def resolve_data_axis(data: int) -> int:
    """mesh.data = 0 means one data-parallel group per TPU slice (1 without multi-slice)."""
    if data != 0:
        return data
    import jax

    return len({getattr(d, "slice_index", 0) for d in jax.devices()})


def dit_model_config(config: ConfigDict, latent_shape: tuple[int, int, int]):
    """The DiTConfig of the job for latents of shape (h, w, c)."""
    import dataclasses

    from eqvae_jax.models.dit import dit_config

    m = config.model
    base = dit_config(
        m.size, m.patch,
        input_size=latent_shape[0], in_channels=latent_shape[2], num_classes=m.num_classes,
        class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma,
        compute_dtype=m.compute_dtype, remat=m.remat,
    )
    return dataclasses.replace(base, **dict(m.overrides.to_dict()))


def apply_tiny(config: ConfigDict) -> ConfigDict:
    """The CPU-sized variant of a job: a 2-block 32-wide model on the tiny demo latent cache, a few steps.

    Make the cache first: python -m eqvae_jax.main --config=configs/extract_latents.py:tiny
    --workdir=workdirs/latents_tiny
    """
    config.model.size = "S"
    config.model.overrides = {"depth": 2, "hidden_size": 32, "num_heads": 2}
    config.model.num_classes = 10
    config.model.compute_dtype = "float32"
    config.latents.cache_dir = "workdirs/latents_tiny"
    config.global_batch_size = 8
    config.total_steps = 4
    config.optim.lr = 3e-3  # a toy set learns visibly within a few dozen steps
    config.ema_decay = 0.9
    config.fsdp_min_size = 256
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.log.every_steps = 2
    config.log.sample_count = 8
    config.log.sample_steps = 4
    config.sample.num_steps = 8
    return config
