"""Build the three networks of the EQ-VAE job from its config: autoencoder, discriminator, LPIPS.

Each is split once into (graphdef, state) for the functional jitted steps (architecture.md §2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
from flax import nnx
from ml_collections import ConfigDict

from eqvae_jax.models import discriminator, kl_vae, lpips
from eqvae_jax.models.host_init import init_on_host


@dataclasses.dataclass(frozen=True)
class Networks:
    """Static graph definitions plus initial states of the job's networks."""

    vae_graph: nnx.GraphDef
    vae_params: nnx.State
    vae_config: kl_vae.KLVAEConfig
    disc_graph: nnx.GraphDef
    disc_params: nnx.State
    disc_stats: nnx.State
    lpips_graph: nnx.GraphDef | None
    lpips_state: nnx.State | None


def build_vae(config: ConfigDict) -> kl_vae.KLVAE:
    m = config.model
    if m.init == "weights":
        vae = kl_vae.load(m.weights, dtype=m.dtype)
        logging.info("autoencoder: loaded %s", m.weights)
        return vae
    overrides: dict[str, Any] = dict(m.overrides.to_dict()) if m.overrides else {}
    overrides["dtype"] = m.dtype
    vae_config = kl_vae.PRESETS[m.preset](**overrides)
    logging.info("autoencoder: random init of %s %s", m.preset, overrides)
    return kl_vae.build(vae_config, seed=config.seed)


def build_discriminator(config: ConfigDict, stats_groups: int) -> discriminator.NLayerDiscriminator:
    d = config.disc
    if d.weights:
        logging.info("discriminator: loaded %s", d.weights)
        return discriminator.load(d.weights, stats_groups=stats_groups)
    # taming's weights_init: conv N(0, 0.02), BN scale N(1, 0.02), BN bias 0; drawn on the host (fast).
    return init_on_host(
        lambda: discriminator.NLayerDiscriminator(3, d.ndf, d.n_layers, stats_groups=stats_groups, rngs=nnx.Rngs(0)),
        config.seed + 1, kernel_std=0.02, norm_scale_std=0.02,
    )


def build_lpips(config: ConfigDict) -> lpips.LPIPS | None:
    path = config.lpips.weights
    if path == "":
        return None
    if path == "random":
        logging.warning("LPIPS: random VGG weights (demo/test only; not a perceptual metric)")
        return lpips.random_lpips(seed=config.seed + 2)
    return lpips.load(path)


def build_networks(config: ConfigDict, stats_groups: int) -> Networks:
    vae = build_vae(config)
    vae_graph, vae_params = nnx.split(vae, nnx.Param)
    disc = build_discriminator(config, stats_groups)
    disc_graph, disc_params, disc_stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    perceptual = build_lpips(config)
    lpips_graph, lpips_state = nnx.split(perceptual) if perceptual is not None else (None, None)
    return Networks(vae_graph, vae_params, vae.config, disc_graph, disc_params, disc_stats, lpips_graph, lpips_state)
