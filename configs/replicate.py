"""EQ-VAE's chain at small scale on the procedural `shapes` domain, EQ vs control, in one command
(docs/replication.md):

    python -m eqvae_jax.replicate --config=configs/replicate.py --workdir=workdirs/replicate

The default is the schema's defaults (eqvae_jax/replicate/config.py `ReplicateConfig`), sized for about 90
minutes on 2 CPU cores: 32 px images, an f4 KL autoencoder (32/64/64 channels, 4 latent channels) pretrained
600 updates then fine-tuned 300 (EQ: p = 0.5, scales 8/16 and 12/16; control: p = 0), a 4-block 96-wide SiT
per arm and seed (3 seeds) for 2000 updates with sample metrics every 500.

Variants (`:a,b`):
  smoke   the whole chain in about 3 minutes on 2 CPU cores with minimal sizes (a test: its numbers mean nothing)
  tpu     sized for about an hour on a v5e-8 / v5p-8: 64 px, a wider f4 autoencoder (16x16 latents), longer
          fine-tunes, an 8-block 256-wide SiT for 20K updates
"""

from eqvae_jax.replicate.config import defaults
from eqvae_jax.typed_config import parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, smoke=False, tpu=False)
    c = defaults()
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
