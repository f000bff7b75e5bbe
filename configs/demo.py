"""CPU demo: a small KL-VAE at 64 px on the embedded demo photographs, trained from random init with plain
reconstruction, then EQ-VAE fine-tuning; the equivariance error is evaluated before and after.

    python -m eqvae_jax.main --config=configs/demo.py --workdir=workdirs/demo

Deviations from the reference recipe, all for a few minutes on 2 CPU cores: a 4x-downsampling model with
32/64/64 channels; 64 px crops, batch 8, no gradient accumulation; no LPIPS (no pretrained VGG offline);
a 2-layer discriminator (the 3-layer one gives no logits below ~32 px), GAN from the start of fine-tuning;
scales 8/16 and 12/16 only (the reference draws 24 scales k/32; each scale is two more compiled variants);
lr 2e-4 instead of the scaled 7.2e-4.
"""

from eqvae_jax.train.eqvae_config import defaults


def get_config():
    config = defaults()
    config.model.init = "random"
    config.model.preset = "tiny"
    config.model.overrides = {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                              "norm_num_groups": 16, "sample_size": 64}
    config.lpips.weights = ""
    config.loss.perceptual_weight = 0.0
    config.disc.ndf = 32
    config.disc.n_layers = 2
    config.transform.scale_numerators = [8, 12]
    config.transform.scale_denominator = 16

    config.data.source = "demo"
    config.data.image_size = 64
    config.data.repeats_per_epoch = 16
    config.data.worker_count = 0
    config.data.global_batch_size = 8
    config.data.eval_global_batch_size = 8

    config.optim.scale_lr = False
    config.optim.base_lr = 2e-4
    config.optim.accumulate = 1
    config.pretrain_steps = 150
    config.loss.disc_start = 150
    config.total_steps = 300

    config.checkpoint.every_steps = 100
    config.log.every_steps = 25
    config.log.eval_every_steps = 10_000
    config.log.eval_batches = 4
    config.log.images = 8
    return config
