"""The existing jobs' configs, derived from the replication config (one builder per job).

Each builder returns the job's own ConfigDict (its schema's defaults plus what the stage changes), so the job
parses and checks it as it would a config file. Both arms get identical values except the EQ branch
probability. `check_all` parses every derived config before anything runs; configs that name files written by
earlier stages (weights, caches) are checked with those reads off (random init / `check_*=False`).
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.replicate.config import ARMS, AutoencoderSchedule, ReplicateConfig
from eqvae_jax.train.dit import config as dit_config
from eqvae_jax.train.eqvae import config as eqvae_config
from eqvae_jax.train.eval_vae import config as eval_config
from eqvae_jax.train.latents import config as latents_config
from eqvae_jax.typed_config import ConfigError

NUM_CLASSES = 8  # data/shapes.py CLASSES


def paths(root: str) -> dict[str, str]:
    """Where the stages write what later stages read."""
    return {
        "cache": os.path.join(root, "jax_cache"),
        "classifier": os.path.join(root, "classifier", "weights"),
        "pretrain": os.path.join(root, "pretrain", "export", "flax"),
        **{f"vae_{arm}": os.path.join(root, f"finetune_{arm}", "export", "flax") for arm in ARMS},
        **{f"latents_{arm}": os.path.join(root, f"latents_{arm}") for arm in ARMS},
    }


def shapes_data(c: ReplicateConfig, base: ConfigDict) -> ConfigDict:
    """The data section of a job on `shapes` at the chain's image size (in the main process)."""
    d = base
    d.source = "shapes"
    d.shapes_seed = c.shapes_seed
    d.image_size = c.image_size
    d.worker_count = 0
    return d


def vae_overrides(c: ReplicateConfig) -> dict:
    a = c.autoencoder
    return {"base_channels": a.base_channels, "channel_mult": tuple(a.channel_mult), "num_res_blocks": 1,
            "norm_num_groups": a.norm_groups, "latent_channels": a.latent_channels, "sample_size": c.image_size}


def autoencoder(c: ReplicateConfig, root: str, arm: str) -> ConfigDict:
    """'pretrain' (random init, plain reconstruction throughout, no GAN) or an EQ / control fine-tune from the
    pretrained weights (GAN from its first update, as the reference fine-tune)."""
    a, p = c.autoencoder, paths(root)
    x = eqvae_config.defaults()
    if arm == "pretrain":
        x.model.init, x.model.preset, x.model.seed = "random", "tiny", c.seed
        x.model.overrides = vae_overrides(c)
    else:
        x.model.init, x.model.weights = "weights", p["pretrain"]
    return autoencoder_schedule(x, c, a, arm, p["cache"])


def autoencoder_schedule(x: ConfigDict, c: ReplicateConfig, a: AutoencoderSchedule, arm: str,
                         cache: str) -> ConfigDict:
    """What the KL and VQ autoencoder stages share (`x` already has its model): data, batch, learning rate,
    updates, the GAN start and the EQ branch probability of `arm` ('pretrain', 'eq' or 'control'), no LPIPS."""
    pretrain = arm == "pretrain"
    x.lpips.weights = ""
    x.loss.perceptual_weight = 0.0  # no pretrained VGG offline
    x.disc.ndf, x.disc.n_layers = a.disc_channels, a.disc_layers
    x.transform.scale_numerators = list(a.scale_numerators)
    x.transform.scale_denominator = a.scale_denominator
    x.transform.p_equivariance = a.p_equivariance if arm == "eq" else 0.0
    shapes_data(c, x.data)
    x.data.seed = c.seed
    x.seed = c.seed
    x.global_batch_size = a.batch_size
    x.eval.global_batch_size = a.batch_size
    x.optim.scale_lr, x.optim.base_lr, x.optim.accumulate = False, a.learning_rate, 1
    updates = a.pretrain_updates if pretrain else a.finetune_updates
    x.total_updates = updates
    x.pretrain_updates = updates if pretrain else 0  # plain reconstruction for every pretraining update
    x.loss.disc_start = updates if pretrain else 0
    x.checkpoint.every_updates = min(a.checkpoint_every, updates)
    x.log.every_updates = max(1, updates // 10)
    x.eval.every_updates, x.eval.batches, x.eval.images = updates, 0, 0
    x.compile.workers = c.compile_workers
    x.compilation_cache_dir = cache
    return x


def evaluation(c: ReplicateConfig, root: str) -> ConfigDict:
    """eval_vae of both arms in one pass over the held-out shapes, rFID in the shapes classifier's features."""
    e, p = c.eval, paths(root)
    x = eval_config.defaults()
    x.models = {arm: eval_config.model_section(init="weights", kind="kl_vae", weights=p[f"vae_{arm}"]) for arm in ARMS}
    shapes_data(c, x.data)
    x.data.shapes_eval_size = max(e.num_images, DataConfig.shapes_eval_size)
    x.num_images = e.num_images
    x.global_batch_size = e.batch_size
    x.shard_size = e.batch_size * 4
    x.inception = p["classifier"]
    x.lpips = ""
    x.id_images = e.id_images
    x.preview_images = e.preview_images
    x.compilation_cache_dir = p["cache"]
    return x


def extraction(c: ReplicateConfig, root: str, arm: str) -> ConfigDict:
    """The arm's latent cache of `latents.train_images` shapes train images, with their labels."""
    lat, p = c.latents, paths(root)
    x = latents_config.defaults()
    x.vae.init, x.vae.weights = "weights", p[f"vae_{arm}"]
    shapes_data(c, x.data)
    x.data.shapes_train_size = lat.train_images
    x.batch_size_per_process = lat.batch_size
    x.chunk_size = lat.batch_size * 16
    x.compilation_cache_dir = p["cache"]
    return x


def dit(c: ReplicateConfig, root: str, arm: str, seed: int, scaling_factor: float = 0.0) -> ConfigDict:
    """A small class-conditional DiT/SiT on the arm's cache; identical for both arms. `scaling_factor` puts the
    arm's latents at unit standard deviation (measured by the evaluation stage), as SD's 0.18215 does for SD-VAE."""
    d, p = c.dit, paths(root)
    x = dit_config.defaults()
    x.objective = d.objective
    x.model.size, x.model.patch = "S", d.patch
    x.model.overrides = {"depth": d.depth, "hidden_size": d.hidden_size, "num_heads": d.num_heads}
    x.model.num_classes = NUM_CLASSES
    x.model.compute_dtype = "float32"
    x.model.learn_sigma = d.objective == "ddpm"
    x.latents.cache_dir = p[f"latents_{arm}"]
    x.latents.seed = seed
    x.latents.scaling_factor = scaling_factor
    x.latents.shift_factor = 0.0
    x.seed = seed
    x.global_batch_size = d.batch_size
    x.total_updates = d.updates
    x.optim.lr = d.learning_rate
    x.ema_decay = d.ema_decay
    x.fsdp_min_size = 1 << 30  # tiny: everything replicated
    x.checkpoint.every_updates = d.eval_every
    x.checkpoint.keep_every = d.eval_every  # every evaluated checkpoint stays for the sample metrics
    x.checkpoint.async_save = False
    x.log.every_updates = max(1, d.updates // 10)
    x.sample.sampler = d.sampler
    x.sample.num_steps = d.sampling_steps
    x.sample.seed = d.sample_seed
    x.compilation_cache_dir = p["cache"]
    return x


def check_all(c: ReplicateConfig, root: str) -> None:
    """Parse every derived job config (files of later stages not read); one ConfigError with every problem."""
    problems: list[str] = []

    def collect(stage: str, fn, *args, **kw) -> None:
        try:
            fn(*args, **kw)
        except ConfigError as e:
            problems.extend(f"{stage}: {p}" for p in e.problems)

    collect("pretrain", eqvae_config.parse_config, autoencoder(c, root, "pretrain"))
    for arm in ARMS:  # the fine-tunes as they will run, but from a random model of the pretrained architecture
        x = autoencoder(c, root, arm)
        x.model.init, x.model.preset, x.model.overrides = "random", "tiny", vae_overrides(c)
        collect(f"finetune_{arm}", eqvae_config.parse_config, x)
        x = extraction(c, root, arm)
        x.vae.init, x.vae.preset, x.vae.overrides = "random", "tiny", vae_overrides(c)
        collect(f"latents_{arm}", latents_config.parse_config, x)
        collect(f"dit_{arm}", dit_config.parse_config, dit(c, root, arm, (c.dit.seeds or (0,))[0]), check_cache=False)
    x = evaluation(c, root)
    for arm in ARMS:
        x.models[arm] = eval_config.model_section(init="random", kind="kl_vae", preset="tiny",
                                                  overrides=vae_overrides(c))
    x.inception = "random"
    collect("eval", eval_config.parse_config, x)
    if problems:
        raise ConfigError(problems)

