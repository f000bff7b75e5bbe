"""EQ-VAE's chain at small scale on the procedural `shapes` domain, EQ vs control, in one command
(docs/replication.md):

    python -m eqvae_jax.replicate --config=configs/replicate.py --workdir=workdirs/replicate

The default is the schema's defaults (eqvae_jax/replicate/config.py `ReplicateConfig`), both families. KL (sized
for about 90 minutes on 2 CPU cores): 32 px images, an f4 KL autoencoder (32/64/64 channels, 4 latent channels)
pretrained 600 updates then fine-tuned 300 (EQ: p = 0.5, scales 8/16 and 12/16; control: p = 0), a 4-block
96-wide SiT per arm and seed (3 seeds) for 2000 updates with sample metrics every 500. VQ (extrapolated to
about 35 minutes more on quiet cores, docs/replication.md): an f8 VQGAN (32/64/64/64 channels, 128 codes of 16
channels, 4x4 tokens: the SiT's 16 positions) pretrained and fine-tuned as the KL autoencoder, a 4-layer 96-wide
MaskGIT per arm and seed (3 seeds) for 2000 updates, sized like the SiT.

Variants (`:a,b`):
  kl      the KL family only (classifier, KL autoencoders, latent caches, DiT/SiT, report)
  vq      the VQ family only (classifier, VQ autoencoders, token caches, MaskGIT, report)
  smoke   the whole chain in about 3 minutes on 2 CPU cores with minimal sizes (a test: its numbers mean nothing)
  tpu     sized for about an hour on a v5e-8 / v5p-8: 64 px, a wider f4 KL autoencoder (16x16 latents) and f8
          VQGAN (8x8 tokens), longer fine-tunes, an 8-block 256-wide SiT and an 8-layer 256-wide MaskGIT for 20K
          updates each
"""

from eqvae_jax.replicate.config import defaults
from eqvae_jax.typed_config import ConfigError, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, smoke=False, tpu=False, kl=False, vq=False)
    if a.kl and a.vq:
        raise ConfigError(["config variants 'kl' and 'vq' each run one family; leave both out to run both"])
    c = defaults()
    c.kl, c.vq = not a.vq, not a.kl
    if a.smoke:
        apply_smoke(c)
    if a.tpu:
        apply_tpu(c)
    return c


def apply_smoke(c) -> None:
    """Minimal sizes: every stage runs, in seconds each."""
    ae = c.autoencoder
    ae.base_channels, ae.norm_groups, ae.disc_channels = 8, 4, 8
    ae.batch_size = 8
    ae.pretrain_updates, ae.finetune_updates, ae.checkpoint_every = 3, 3, 3
    ae.scale_numerators = [8]
    k = c.classifier
    k.steps, k.batch_size, k.train_images, k.eval_images, k.channels = 20, 32, 128, 64, [8, 16]
    c.eval.num_images, c.eval.id_images, c.eval.batch_size, c.eval.preview_images = 64, 64, 32, 3
    c.latents.train_images, c.latents.batch_size = 64, 32
    d = c.dit
    d.depth, d.hidden_size, d.num_heads = 1, 32, 2
    d.updates, d.batch_size, d.eval_every = 4, 16, 2
    d.num_samples, d.sampling_steps = 32, 2
    d.seeds = (0, 1)  # two seeds per arm: the mean and min-max band code runs; a third adds stages, no code path
    v = c.vq_autoencoder
    v.channel_mult, v.attn_resolutions, v.embed_dim, v.n_embed = [1, 1, 1, 1], [], 4, 16
    v.disc_channels, v.batch_size = 8, 8
    v.pretrain_updates, v.finetune_updates, v.checkpoint_every = 3, 3, 3
    v.scale_numerators = [8]
    c.tokens.train_images, c.tokens.batch_size = 64, 32
    m = c.maskgit
    m.depth, m.hidden_dim, m.heads, m.mlp_dim = 1, 32, 2, 64
    m.updates, m.batch_size, m.eval_every, m.warmup_updates = 4, 16, 2, 2
    m.num_samples, m.sampling_steps = 32, 2
    m.seeds = (0, 1)


def apply_tpu(c) -> None:
    """About an hour on a v5e-8 / v5p-8 (not yet run there)."""
    c.image_size = 64
    ae = c.autoencoder
    ae.base_channels, ae.channel_mult = 64, [1, 2, 4]
    ae.batch_size = 64
    ae.pretrain_updates, ae.finetune_updates, ae.checkpoint_every = 5000, 2000, 500
    ae.scale_numerators = [8, 10, 12, 14]
    c.classifier.steps, c.classifier.train_images = 3000, 32768
    c.eval.num_images, c.eval.id_images, c.eval.batch_size = 5000, 5000, 200
    c.latents.train_images, c.latents.batch_size = 65536, 256
    d = c.dit
    d.depth, d.hidden_size = 8, 256
    d.updates, d.batch_size, d.eval_every = 20000, 256, 4000
    d.learning_rate = 3e-4
    d.num_samples, d.sampling_steps = 2000, 50
    v = c.vq_autoencoder
    v.base_channels, v.channel_mult, v.attn_resolutions, v.embed_dim, v.n_embed = 64, [1, 2, 2, 4], [8], 32, 512
    v.batch_size = 64
    v.pretrain_updates, v.finetune_updates, v.checkpoint_every = 5000, 2000, 500
    v.scale_numerators = [8, 10, 12, 14]
    c.tokens.train_images, c.tokens.batch_size = 65536, 256
    m = c.maskgit
    m.depth, m.hidden_dim, m.heads, m.mlp_dim = 8, 256, 8, 1024
    m.updates, m.batch_size, m.eval_every = 20000, 256, 4000
    m.learning_rate, m.warmup_updates = 3e-4, 1000
    m.num_samples = 2000
