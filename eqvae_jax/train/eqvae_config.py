"""Defaults and validation of the EQ-VAE fine-tuning job config (`trainer = 'eqvae'`).

The defaults are the reference recipe (recipe.md §2): job files (configs/sdvae_ft.py, configs/demo.py) start from
`defaults()` and change what differs. `validate()` runs before anything is built or compiled: a key the defaults
do not have (a typo in a config file) is an error with a suggestion, as are impossible batch/mesh splits,
inconsistent probabilities and weight paths that do not exist.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

import ml_collections
from ml_collections import ConfigDict

from eqvae_jax.data import config as data_config
from eqvae_jax.losses import autoencoder, equivariance


class ConfigError(ValueError):
    """The job config is wrong; raised before any model is built or compiled."""


def defaults() -> ConfigDict:
    c = ConfigDict()
    c.trainer = "eqvae"
    c.seed = 23  # reference seed_everything(23)
    c.total_steps = 100_000  # optimizer updates (the reference trained 5 epochs of OpenImages, stopped by hand)

    c.mesh = ConfigDict({"data": -1, "fsdp": 1})  # autoencoder jobs: pure data parallel

    # Autoencoder. init: 'weights' (a converted Flax weights dir, see `python -m eqvae_jax.convert`) or 'random'.
    c.model = ConfigDict()
    c.model.init = "weights"
    c.model.weights = ""
    c.model.preset = "sd_vae"  # for init='random': a kl_vae preset name
    c.model.overrides = ConfigDict()  # for init='random': KLVAEConfig field overrides (e.g. channel_mult)
    c.model.dtype = "float32"  # compute dtype; the reference is fp32

    # Discriminator: from a converted weights dir, else the reference init.
    c.disc = ConfigDict()
    c.disc.weights = ""
    c.disc.ndf = 64
    c.disc.n_layers = 3
    # BatchNorm statistics groups: 0 = groups of 10 images, the reference's per-GPU batch (one group per batch
    # shard when the micro-batch is not a multiple of 10); G > 0 = G groups. 1 = statistics of the whole batch.
    c.disc.stats_groups = 0

    # LPIPS: a converted weights dir; '' with loss.perceptual_weight 0 skips LPIPS; 'random' = random VGG (demo).
    c.lpips = ConfigDict({"weights": ""})

    # Loss (LDM LPIPSWithDiscriminator as EQ-VAE configures it; field docs in losses/autoencoder.py LossConfig).
    c.loss = autoencoder.default_config()
    # The equivariance transform sampler (reference branch mix and scale grid; losses/equivariance.py).
    c.transform = equivariance.default_config()
    # 'redraw': the discriminator step draws its own transform and runs its own forward pass (reference);
    # 'shared': it reuses the generator step's (target, reconstruction) pair (one autoencoder forward fewer).
    c.d_step_transform = "redraw"

    # Optimizers: two Adams, constant LR. scale_lr: lr = accumulate * global_batch * base_lr (reference: 2*80*4.5e-6).
    c.optim = ConfigDict()
    c.optim.base_lr = 4.5e-6
    c.optim.scale_lr = True
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.eps = 1e-8
    c.optim.accumulate = 2  # micro-batches per optimizer update (reference accumulate_grad_batches)

    c.ema = ConfigDict({"enabled": False, "decay": 0.9999})  # EMA of the autoencoder (off in the reference)

    c.pretrain_steps = 0  # plain-reconstruction updates before EQ fine-tuning (demo from random init)

    c.data = data_config.get_config()
    c.data.global_batch_size = 80  # per micro-batch: 8 GPUs x 10 in the reference; x accumulate 2 = 160

    c.checkpoint = ConfigDict({"every_steps": 2000, "max_to_keep": 3, "keep_every": 0, "async_save": True})
    c.log = ConfigDict()
    c.log.every_steps = 50
    c.log.eval_every_steps = 2000
    c.log.eval_batches = 8  # held-out batches for PSNR/SSIM/LPIPS/equivariance error (0 = no periodic eval)
    c.log.images = 8  # images in the reconstruction summaries
    c.max_consecutive_nonfinite = 20  # stop after this many skipped non-finite steps in a row
    c.export_diffusers = True  # write WORKDIR/export/diffusers at the end of training
    c.compilation_cache_dir = ""  # '' = WORKDIR/jax_cache
    return c


def learning_rate(config: ConfigDict) -> float:
    o = config.optim
    if not o.scale_lr:
        return float(o.base_lr)
    return float(o.accumulate * config.data.global_batch_size * o.base_lr)


def unknown_keys(got: Mapping, ref: Mapping, prefix: str = "") -> list[str]:
    """Keys of `got` (plain nested dicts) that `ref` does not have, each with a close-match suggestion."""
    problems = []
    for key, value in got.items():
        name = f"{prefix}{key}"
        if key not in ref:
            hint = difflib.get_close_matches(key, list(ref.keys()), n=1)
            problems.append(f"unknown key '{name}'" + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""))
        elif isinstance(value, Mapping) and isinstance(ref[key], Mapping) and key != "overrides":
            problems.extend(unknown_keys(value, ref[key], f"{name}."))
    return problems


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError listing every problem found; cheap, touches no device beyond counting them."""
    import jax

    from eqvae_jax.models import kl_vae
    from eqvae_jax.parallel.mesh import mesh_shape

    problems = unknown_keys(config.to_dict(), defaults().to_dict())
    num_devices = jax.device_count() if num_devices is None else num_devices
    try:
        data, fsdp = mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp)
        shards = data * fsdp
        for name in ("global_batch_size", "eval_global_batch_size"):
            batch = config.data.get(name, 0) or config.data.global_batch_size
            if batch % shards:
                problems.append(f"data.{name}={batch} is not divisible by the {shards} batch shards "
                                f"(mesh data={data} x fsdp={fsdp})")
        groups = config.disc.stats_groups
        per_step = config.data.global_batch_size
        if groups and per_step % groups:
            problems.append(f"disc.stats_groups={groups} does not divide data.global_batch_size={per_step}")
    except ValueError as e:
        problems.append(str(e))
    if config.model.init not in ("weights", "random"):
        problems.append(f"model.init must be 'weights' or 'random', not {config.model.init!r}")
    if config.model.init == "weights":
        check_weights_dir(problems, "model.weights", config.model.weights, required=True)
    elif config.model.preset not in kl_vae.PRESETS:
        problems.append(f"model.preset {config.model.preset!r} is not one of {sorted(kl_vae.PRESETS)}")
    check_weights_dir(problems, "disc.weights", config.disc.weights, required=False)
    if config.lpips.weights not in ("", "random"):
        check_weights_dir(problems, "lpips.weights", config.lpips.weights, required=True)
    elif config.lpips.weights == "" and config.loss.perceptual_weight:
        problems.append("loss.perceptual_weight > 0 needs lpips.weights (a converted LPIPS dir, or 'random')")
    for name, section, cls in (("loss", config.loss, autoencoder.LossConfig),
                               ("transform", config.transform, equivariance.TransformConfig)):
        try:
            cls.from_config(section)
        except (ValueError, TypeError) as e:
            problems.append(f"{name}: {e}")
    if config.d_step_transform not in ("redraw", "shared"):
        problems.append(f"d_step_transform must be 'redraw' or 'shared', not {config.d_step_transform!r}")
    for name in ("log.every_steps", "log.eval_every_steps", "checkpoint.every_steps"):
        section, field = name.split(".")
        if config[section][field] < 1:
            problems.append(f"{name} must be >= 1 (micro-steps)")
    problems.extend(shape_problems(config))
    if config.optim.accumulate < 1:
        problems.append("optim.accumulate must be >= 1")
    if config.total_steps < 1 or config.pretrain_steps < 0 or config.pretrain_steps > config.total_steps:
        problems.append("need total_steps >= 1 and 0 <= pretrain_steps <= total_steps")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def disc_stats_groups(config: ConfigDict, batch_shards: int) -> int:
    """The discriminator's BatchNorm group count for `config` (see defaults(): disc.stats_groups)."""
    if config.disc.stats_groups:
        return config.disc.stats_groups
    batch = config.data.global_batch_size
    return batch // 10 if batch % 10 == 0 else batch_shards


def shape_problems(config: ConfigDict) -> list[str]:
    """Every transform the sampler can draw must give a target the decoder can produce and D can score.

    Checked here so that a bad image size / scale grid fails before compiling, not when a scale is first drawn.
    """
    from eqvae_jax.losses import resample
    from eqvae_jax.models import kl_vae, weights

    try:
        if config.model.init == "weights":
            vae_config = kl_vae.KLVAEConfig.from_dict(weights.read_config(config.model.weights)[1])
        else:
            overrides = dict(config.model.overrides.to_dict()) if config.model.overrides else {}
            vae_config = kl_vae.PRESETS[config.model.preset](**overrides)
        cfg = equivariance.TransformConfig.from_config(config.transform)
    except (ValueError, TypeError, KeyError, FileNotFoundError):
        return []  # reported by the other checks
    f, size = vae_config.downsample_factor, config.data.image_size
    if size % f:
        return [f"data.image_size={size} is not divisible by the autoencoder's downsampling factor {f}"]
    problems = []
    for plan in equivariance.all_plans(cfg, (size, size)):
        if plan.branch is equivariance.Branch.PLAIN:
            continue
        image = [resample.resized_size(size, n, plan.denominator) for n in plan.scale]
        latent = [resample.resized_size(size // f, n, plan.denominator) for n in plan.scale]
        if plan.branch is equivariance.Branch.EQUIVARIANCE and image != [f * n for n in latent]:
            problems.append(f"transform {plan}: the target image is {image} px but the decoded scaled latent is "
                            f"{[f * n for n in latent]} px; choose scales with image_size/{f} * scale integral")
        if plan.branch is equivariance.Branch.LOWRES and any(n % f for n in image):
            problems.append(f"transform {plan}: the low-res image {image} px is not divisible by {f}")
        logits = min(image) // 2 ** config.disc.n_layers - 2
        if logits < 1:
            problems.append(f"transform {plan}: a {min(image)} px target gives the {config.disc.n_layers}-layer "
                            "discriminator no logits")
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def check_weights_dir(problems: list[str], name: str, path: str, required: bool) -> None:
    if not path:
        if required:
            problems.append(f"{name} is empty: give a converted Flax weights dir (python -m eqvae_jax.convert)")
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        problems.append(f"{name}={path!r} is not a converted weights dir (no config.json there)")


def to_json_dict(config: ConfigDict) -> dict:
    """The config as plain JSON data (for the checkpoint's config item)."""
    return ml_collections.ConfigDict(config).to_dict()
