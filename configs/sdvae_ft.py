"""EQ-VAE fine-tuning of SD-VAE (LDM kl-f8): the zelaki/eqvae reference recipe.

    python -m eqvae_jax.main --config=configs/sdvae_ft.py --workdir=gs://.../eqvae_sdvae \
        --config.model.weights=weights/sd_vae --config.lpips.weights=weights/lpips \
        --config.disc.weights=weights/kl_f8_disc

The recipe is the schema's defaults (eqvae_jax/train/eqvae/config.py `EQVAEConfig`, each value with its source
in zelaki/eqvae's eqvae_config.yaml and main.py): two Adams, betas (0.5, 0.9), lr = 2 x 80 x 4.5e-6 = 7.2e-4
constant, 80 images per micro-step x 2 micro-steps, 54,470 updates, GAN from update 0 (hinge, adaptive weight
x 0.5), KL 1e-6, LPIPS 1.0 in train mode, the 0.5 / 0.125 / 0.375 branch mix with scales k/32 (k = 8..31), 256 px
random 50-100% square crops without flips, fp32, seed 23. This file names the converted weights (python -m
eqvae_jax.convert, README) and the variants (`:a,b=c`):
  vae=sdxl | vae=sd3   the paper's SDXL-VAE and SD3-VAE rows (same recipe; SD3: 16 latent channels, no quant
                       convs, latents shifted by 0.0609 then scaled by 1.5305, read from the converted weights)
  ema                  the eq-vae-ema release: 44 ImageNet epochs (352,321 updates), EMA of the autoencoder weights
  tiny                 seconds on a CPU (tests, smoke runs): random tiny model, demo photos at 32 px
Data: ImageNet (TFDS imagenet2012 as ArrayRecord); OpenImages with --config.data.source=folder
--config.data.folder=DIR. The discriminator is warm-started from the LDM checkpoint's loss.discriminator.* when
--config.disc.weights is given, else initialised as taming's.
"""

from eqvae_jax.train.eqvae.config import defaults
from eqvae_jax.typed_config import parse_arg

WEIGHTS = {"sd": "weights/sd_vae", "sdxl": "weights/sdxl_vae", "sd3": "weights/sd3_vae"}


def get_config(arg: str = ""):
    a = parse_arg(arg, choices={"vae": WEIGHTS}, vae="sd", ema=False, tiny=False)
    c = defaults()
    c.model.weights = WEIGHTS[a.vae]  # the pretrained VAE, converted (diffusers or LDM layout)
    c.lpips.weights = "weights/lpips"  # VGG LPIPS (python -m eqvae_jax.convert --kind lpips)
    if a.ema:  # eq-vae-ema: the model card's "44 epochs on ImageNet with EMA weights" (decay not published)
        c.total_updates = 352_321  # ceil(44 epochs * 1,281,167 ImageNet train images / 160 per update)
        c.ema.enabled = True
    if a.tiny:
        apply_tiny(c, a.vae)
    return c


def apply_tiny(c, vae: str) -> None:
    """Random tiny autoencoder on the embedded photos at 32 px, a few updates: seconds on a CPU."""
    c.model.init = "random"
    c.model.preset = "sd3_vae" if vae == "sd3" else "tiny"
    c.model.overrides = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "norm_num_groups": 4,
                         "sample_size": 32}
    c.model.seed = c.seed
    c.lpips.weights = ""  # a random VGG16 would dominate the step; tests switch it on where they need it
    c.loss.perceptual_weight = 0.0
    c.disc.ndf, c.disc.n_layers = 8, 2
    c.transform.scale_numerators = [8]  # 0.5: one equivariance and one low-res variant
    c.transform.scale_denominator = 16
    c.data.source = "demo"
    c.data.image_size = 32
    c.data.worker_count = 0
    c.global_batch_size = 8
    c.total_updates = 4
    c.log.every_updates = 1
    c.eval.every_updates = 2
    c.eval.batches = 1
    c.eval.images = 2
    c.checkpoint.every_updates = 2
