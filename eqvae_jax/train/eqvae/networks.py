"""The three networks of the EQ fine-tuning job (autoencoder of either family, discriminator, LPIPS), each split
once into (graphdef, state) for the functional jitted steps. A VQGAN's codebook is one of its Params, trained by
the generator's optimizer with the rest of the autoencoder (taming's opt_ae)."""

from __future__ import annotations

import dataclasses
import logging

from flax import nnx

from eqvae_jax.models import discriminator, kl_vae, lpips, vq_vae
from eqvae_jax.models.autoencoders import build_autoencoder
from eqvae_jax.train.eqvae.config import DiscConfig, FinetuneConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Networks:
    """Static graph definitions plus initial states of the job's networks."""

    vae_graph: nnx.GraphDef
    vae_params: nnx.State
    vae_config: kl_vae.KLVAEConfig | vq_vae.VQVAEConfig
    disc_graph: nnx.GraphDef
    disc_params: nnx.State
    disc_stats: nnx.State
    disc_stats_groups: int  # the discriminator's BatchNorm statistics groups
    lpips_graph: nnx.GraphDef | None
    lpips_state: nnx.State | None


def build_discriminator(d: DiscConfig, stats_groups: int, seed: int) -> discriminator.NLayerDiscriminator:
    """From `d.weights` (ndf / n_layers then come from the weights), else taming's weights_init."""
    if d.weights:
        log.info("discriminator: loaded %s", d.weights)
        return discriminator.load(d.weights, stats_groups=stats_groups)
    return discriminator.build(discriminator.DiscriminatorConfig(3, d.ndf, d.n_layers, stats_groups), seed=seed)


def build_lpips(weights: str, seed: int) -> lpips.LPIPS | None:
    if weights == "":
        return None
    if weights == "random":
        log.warning("LPIPS: random VGG weights (demo/test only; not a perceptual metric)")
        return lpips.build(seed=seed)
    return lpips.load(weights)


def _split(vae: kl_vae.KLVAE | vq_vae.VQVAE, disc: discriminator.NLayerDiscriminator,
           perceptual: lpips.LPIPS | None) -> Networks:
    vae_graph, vae_params = nnx.split(vae, nnx.Param)
    disc_graph, disc_params, disc_stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    lpips_graph, lpips_state = nnx.split(perceptual) if perceptual is not None else (None, None)
    return Networks(vae_graph, vae_params, vae.config, disc_graph, disc_params, disc_stats, disc.stats_groups,
                    lpips_graph, lpips_state)


def build_networks(config: FinetuneConfig, stats_groups: int) -> Networks:
    """The job's networks with their weights (loaded, or initialised like the reference)."""
    return _split(build_autoencoder(config.model), build_discriminator(config.disc, stats_groups, config.seed + 1),
                  build_lpips(config.lpips.weights, config.seed + 2))


def abstract_networks(config: FinetuneConfig, stats_groups: int) -> Networks:
    """The same networks with shape-only variables (ahead-of-time compiles, e.g. for TPU targets on a CPU)."""
    d = config.disc
    disc = discriminator.abstract(discriminator.DiscriminatorConfig(3, d.ndf, d.n_layers, stats_groups))
    perceptual = lpips.abstract() if config.lpips.weights else None
    return _split(config.model.module.abstract(config.model.model_config()), disc, perceptual)
