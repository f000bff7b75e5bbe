"""The VQ family's job configs, derived from the replication config (one builder per job, as jobs.py for KL).

The EQ fine-tuning job with trainer 'eqvqgan' (pretraining and both fine-tunes), eval_vae on VQ models, the
token extraction job and the MaskGIT job. Both arms get identical values except the EQ branch probability.
`problems` parses every derived config before anything runs, with files of later stages not read.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from eqvae_jax.data.config import DataConfig
from eqvae_jax.models import vq_vae
from eqvae_jax.replicate.config import ARMS, ReplicateConfig
from eqvae_jax.replicate.jobs import NUM_CLASSES, autoencoder_schedule, shapes_data
from eqvae_jax.train.eqvae import config as eqvae_config
from eqvae_jax.train.eval_vae import config as eval_config
from eqvae_jax.train.latents import config as latents_config
from eqvae_jax.train.maskgit import config as maskgit_config
from eqvae_jax.typed_config import ConfigError


def paths(root: str) -> dict[str, str]:
    """Where the VQ stages write what later stages read (the classifier and compile cache: jobs.paths)."""
    return {
        "vq_pretrain": os.path.join(root, "vq_pretrain", "export", "flax"),
        **{f"vq_{arm}": os.path.join(root, f"vq_finetune_{arm}", "export", "flax") for arm in ARMS},
        **{f"tokens_{arm}": os.path.join(root, f"tokens_{arm}") for arm in ARMS},
    }


def vq_overrides(c: ReplicateConfig) -> dict:
    v = c.vq_autoencoder
    return {"base_channels": v.base_channels, "channel_mult": tuple(v.channel_mult), "num_res_blocks": 1,
            "attn_resolutions": tuple(v.attn_resolutions), "resolution": c.image_size, "z_channels": v.embed_dim,
            "embed_dim": v.embed_dim, "n_embed": v.n_embed, "norm_num_groups": 32}


def autoencoder(c: ReplicateConfig, root: str, arm: str, cache: str) -> ConfigDict:
    """'pretrain' (random init, plain reconstruction throughout, no GAN) or an EQ / control fine-tune from the
    pretrained weights (GAN from its first update), all under taming's VQ objective without LPIPS."""
    v = c.vq_autoencoder
    x = eqvae_config.defaults("eqvqgan")
    if arm == "pretrain":
        x.model.init, x.model.preset, x.model.seed = "random", "tiny", c.seed
        x.model.overrides = vq_overrides(c)
    else:
        x.model.init, x.model.weights = "weights", paths(root)["vq_pretrain"]
    x.disc.weights = ""
    return autoencoder_schedule(x, c, v, arm, cache)


def evaluation(c: ReplicateConfig, root: str, classifier: str, cache: str) -> ConfigDict:
    """eval_vae of both VQ arms in one pass over the held-out shapes (the KL evaluation's images and sizes)."""
    e, p = c.eval, paths(root)
    x = eval_config.defaults()
    x.models = {arm: eval_config.model_section(init="weights", kind=vq_vae.KIND, weights=p[f"vq_{arm}"])
                for arm in ARMS}
    shapes_data(c, x.data)
    x.data.shapes_eval_size = max(e.num_images, DataConfig.shapes_eval_size)
    x.num_images = e.num_images
    x.global_batch_size = e.batch_size
    x.shard_size = e.batch_size * 4
    x.inception = classifier
    x.lpips = ""
    x.id_images = e.id_images
    x.preview_images = e.preview_images
    x.compilation_cache_dir = cache
    return x


def extraction(c: ReplicateConfig, root: str, arm: str, cache: str) -> ConfigDict:
    """The arm's token cache of `tokens.train_images` shapes train images with labels: one record per image, the
    KL caches' crop and flip (shapes are rendered at the image size, so the crop is the whole image)."""
    t = c.tokens
    x = latents_config.defaults()
    x.trainer = "extract_tokens"
    x.vae.kind = vq_vae.KIND
    x.vae.init, x.vae.weights = "weights", paths(root)[f"vq_{arm}"]
    shapes_data(c, x.data)
    x.data.shapes_train_size = t.train_images
    x.batch_size_per_process = t.batch_size
    x.chunk_size = t.batch_size * 16
    x.compilation_cache_dir = cache
    return x


def maskgit(c: ReplicateConfig, root: str, arm: str, seed: int, cache: str) -> ConfigDict:
    """A small class-conditional MaskGIT on the arm's token cache (v1's objective, optimizer and decoding at a
    small size); identical for both arms."""
    m = c.maskgit
    x = maskgit_config.defaults()
    x.model.preset = "tiny"
    x.model.overrides = {"depth": m.depth, "hidden_dim": m.hidden_dim, "heads": m.heads, "mlp_dim": m.mlp_dim}
    x.model.num_classes = NUM_CLASSES
    x.model.dropout = m.dropout
    x.model.compute_dtype = "float32"
    x.tokens.cache_dir = paths(root)[f"tokens_{arm}"]
    x.tokens.seed = seed
    x.seed = seed
    x.global_batch_size = m.batch_size
    x.total_updates = m.updates
    x.optim.lr = m.learning_rate
    x.optim.warmup_updates = m.warmup_updates
    x.ema.enabled = m.ema_decay > 0
    x.ema.decay = m.ema_decay if m.ema_decay > 0 else maskgit_config.EMAConfig.decay
    x.fsdp_min_size = 1 << 30  # tiny: everything replicated
    x.checkpoint.every_updates = m.eval_every
    x.checkpoint.keep_every = m.eval_every  # every evaluated checkpoint stays for the sample metrics
    x.checkpoint.async_save = False
    x.log.every_updates = max(1, m.updates // 10)
    x.sample.steps = m.sampling_steps
    x.sample.cfg_scale = m.cfg_scale
    x.sample.seed = m.sample_seed
    x.compilation_cache_dir = cache
    return x


def problems(c: ReplicateConfig, root: str, cache: str) -> list[str]:
    """Every VQ stage's derived config parsed (files of later stages not read), problems named by stage."""
    out: list[str] = []

    def collect(stage: str, fn, *args, **kw) -> None:
        try:
            fn(*args, **kw)
        except ConfigError as e:
            out.extend(f"{stage}: {p}" for p in e.problems)

    def random_spec(section: ConfigDict) -> None:
        section.init, section.preset, section.overrides, section.weights = "random", "tiny", vq_overrides(c), ""

    collect("vq_pretrain", eqvae_config.parse_config, autoencoder(c, root, "pretrain", cache))
    for arm in ARMS:
        x = autoencoder(c, root, arm, cache)
        random_spec(x.model)
        collect(f"vq_finetune_{arm}", eqvae_config.parse_config, x)
        x = extraction(c, root, arm, cache)
        random_spec(x.vae)
        collect(f"tokens_{arm}", latents_config.parse_config, x)
        x = maskgit(c, root, arm, (c.maskgit.seeds or (0,))[0], cache)
        collect(f"maskgit_{arm}", maskgit_config.parse_config, x, check_cache=False)
    x = evaluation(c, root, "random", cache)
    for arm in ARMS:
        x.models[arm] = eval_config.model_section(init="random", kind=vq_vae.KIND, preset="tiny",
                                                  overrides=vq_overrides(c))
    collect("vq_eval", eval_config.parse_config, x)
    return out
