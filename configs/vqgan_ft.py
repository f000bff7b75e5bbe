"""EQ-VQGAN: EQ-VAE fine-tuning of taming's ImageNet VQGAN (f16, 1024 codes), the MaskGIT tokenizer.

    python -m eqvae_jax.convert --kind vq_vae --src vqgan_imagenet_f16_1024/last.ckpt --dst weights/vqgan_f16
    python -m eqvae_jax.convert --kind discriminator --src vqgan_imagenet_f16_1024/last.ckpt \
        --dst weights/vqgan_f16_disc
    python -m eqvae_jax.main --config=configs/vqgan_ft.py --workdir=gs://.../eqvqgan \
        --config.lpips.weights=weights/lpips

The paper (section 3.3) transforms the VQGAN's pre-quantization features, then quantizes and decodes, and gives
no further recipe. This one is the schema's defaults (eqvae_jax/train/eqvae/config.py `EQVQGANConfig`, whose
docstring says what comes from where): taming's `imagenet_vqgan.yaml` objective (VQ loss reduced by the mean,
codebook 1.0, LPIPS 1.0 in train mode, hinge GAN from update 0 at adaptive weight x 0.8) and optimizer (Adams
with betas (0.5, 0.9), lr = 2 x 80 x 4.5e-6 = 7.2e-4 as taming's main.py scales it); the EQ-VAE fine-tune's
seed, batch (80 x 2 micro-steps), transform mix and data (ImageNet, random 50-100% square crops at 256 px, no
flip), scales k/16 (k = 4..15: the 16x16 latent scaled by s must be whole); fp32, no EMA, 40,037 updates (5
ImageNet epochs). This file names the converted weights and the variants. The end of training writes
WORKDIR/export/taming (last.ckpt + model.yaml, loadable by taming and the MaskGIT code) and WORKDIR/export/flax.
Variants (`:tiny` or `:demo`, not both):
  tiny   seconds on a CPU (tests, smoke runs): random tiny VQ model, demo photos at 32 px
  demo   a few minutes per hundred updates on a CPU: a small f4 VQ model from random init at 64 px on the demo
         photos, plain reconstruction for 150 updates, then EQ-VQGAN fine-tuning to 300 (the equivariance
         experiment of docs/jobs.md; `--config.transform.p_equivariance=0` is its control run)
"""

from eqvae_jax.train.eqvae.config import defaults
from eqvae_jax.typed_config import ConfigError, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, tiny=False, demo=False)
    if a.tiny and a.demo:
        raise ConfigError(["config variants 'tiny' and 'demo' are two model sizes: choose one"])
    c = defaults("eqvqgan")
    c.model.weights = "weights/vqgan_f16"  # taming's VQGAN (python -m eqvae_jax.convert --kind vq_vae)
    # Discriminator: warm-started from the same last.ckpt's loss.discriminator.* (--kind discriminator): the GAN
    # is on from update 0, so a fresh D would first have to catch up with a trained generator.
    c.disc.weights = "weights/vqgan_f16_disc"
    c.lpips.weights = "weights/lpips"  # VGG LPIPS (python -m eqvae_jax.convert --kind lpips)
    if a.tiny:
        apply_tiny(c)
    if a.demo:
        apply_demo(c)
    return c


def _random_model(c, **overrides) -> None:
    c.model.init = "random"
    c.model.weights = ""
    c.model.preset = "tiny"
    c.model.overrides = overrides
    c.model.seed = c.seed
    c.disc.weights = ""
    c.lpips.weights = ""  # no pretrained VGG offline
    c.loss.perceptual_weight = 0.0
    c.data.source = "demo"
    c.data.worker_count = 0


def apply_tiny(c) -> None:
    """Random tiny VQ model (the `tiny` preset: f2, 32/64 channels; 16 codes of 4 channels) on the demo photos at
    32 px, a few updates. GroupNorm keeps taming's 32 groups, so that the export is a taming checkpoint."""
    _random_model(c, z_channels=4, embed_dim=4, n_embed=16)
    c.disc.ndf, c.disc.n_layers = 8, 2
    c.transform.scale_numerators = [8]  # 0.5: one equivariance and one low-res variant
    c.data.image_size = 32
    c.global_batch_size = 8
    c.total_updates = 4
    c.log.every_updates = 1
    c.eval.every_updates = 2
    c.eval.batches = 1
    c.eval.images = 2
    c.checkpoint.every_updates = 2


def apply_demo(c) -> None:
    """A small f4 VQ model (32/64/64 channels, attention at the 16 px latent level like taming's f16 at 256 px,
    128 codes of 16 channels) from random init on the demo photos at 64 px: 150 updates of plain reconstruction,
    then EQ-VQGAN fine-tuning to 300 with the GAN on; scales 8/16 and 12/16; lr 2e-4 unscaled, batch 8."""
    _random_model(c, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                  resolution=64, z_channels=16, embed_dim=16, n_embed=128)
    c.disc.ndf, c.disc.n_layers = 32, 2
    c.transform.scale_numerators = [8, 12]
    c.data.image_size = 64
    c.data.repeats_per_epoch = 16
    c.global_batch_size = 8
    c.eval.global_batch_size = 8
    c.optim.scale_lr = False
    c.optim.base_lr = 2e-4
    c.optim.accumulate = 1
    c.pretrain_updates = 150
    c.loss.disc_start = 150
    c.total_updates = 300
    c.checkpoint.every_updates = 100
    c.eval.every_updates = 10_000  # evaluated at the start, after pre-training and at the end
    c.eval.batches = 4
