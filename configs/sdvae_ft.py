"""EQ-VAE fine-tuning of SD-VAE (LDM kl-f8), the reference recipe (recipe.md §2).

    python -m eqvae_jax.main --config=configs/sdvae_ft.py --workdir=gs://.../eqvae_sdvae \
        --config.model.weights=weights/sd_vae --config.lpips.weights=weights/lpips \
        --config.disc.weights=weights/kl_f8_disc

The weights are converted once with `python -m eqvae_jax.convert` (README). Reference values (all defaults):
two Adams betas (0.5, 0.9), lr = accumulate(2) * batch(80) * 4.5e-6 = 7.2e-4, 160 images per update, GAN from
step 0 with disc weight 0.5 (adaptive), KL 1e-6, LPIPS 1.0 with dropout on, 256 px random 50-100% square crops
without flips, branch mix 0.5 equivariance / 0.125 low-res / 0.375 plain. `:tiny` is a CPU-sized variant.
"""

from eqvae_jax.train.eqvae_config import defaults


def get_config(variant: str = ""):
    config = defaults()
    config.data.source = "tfds"  # ImageNet (imagenet2012 in ArrayRecord); use source='folder' for OpenImages
    if variant == "tiny":  # seconds on a CPU: tests and smoke runs (random weights, demo photos, 32 px)
        config.model.init = "random"
        config.model.preset = "tiny"
        config.model.overrides = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                  "norm_num_groups": 4, "sample_size": 32}
        config.lpips.weights = ""  # a random VGG16 would dominate the step; tests switch it on where they need it
        config.loss.perceptual_weight = 0.0
        config.disc.ndf = 8
        config.disc.n_layers = 2
        config.transform.scale_numerators = [8]  # 0.5: one equivariance and one low-res variant
        config.transform.scale_denominator = 16
        config.data.source = "demo"
        config.data.image_size = 32
        config.data.global_batch_size = 8
        config.data.worker_count = 0
        config.optim.accumulate = 2
        config.total_steps = 4
        config.log.every_steps = 2
        config.log.eval_every_steps = 4
        config.log.eval_batches = 1
        config.log.images = 2
        config.checkpoint.every_steps = 4
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'tiny')")
    return config
