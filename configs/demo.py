"""CPU demo: a small KL-VAE at 64 px on the embedded demo photographs, trained from random init with plain
reconstruction, then EQ-VAE fine-tuning; the equivariance error is evaluated before and after.

    python -m eqvae_jax.main --config=configs/demo.py --workdir=workdirs/demo

The reference recipe (configs/sdvae_ft.py) with these changes, all for a few minutes on 2 CPU cores: a
4x-downsampling model with 32/64/64 channels from random init; 64 px crops, batch 8, no gradient accumulation;
no LPIPS (no pretrained VGG offline); a 2-layer discriminator (the 3-layer one gives no logits below ~32 px),
GAN from the start of fine-tuning; scales 8/16 and 12/16 only (the reference draws 24 scales k/32; each scale
is two more compiled variants); lr 2e-4 instead of the scaled 7.2e-4.
"""

from eqvae_jax.train.eqvae.config import defaults


def get_config():
    c = defaults()
    c.model.init = "random"
    c.model.preset = "tiny"
    c.model.overrides = {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                         "norm_num_groups": 16, "sample_size": 64}
    c.model.seed = 23
    c.loss.perceptual_weight = 0.0
    c.disc.ndf, c.disc.n_layers = 32, 2
    c.transform.scale_numerators = [8, 12]
    c.transform.scale_denominator = 16

    c.data.source = "demo"
    c.data.image_size = 64
    c.data.repeats_per_epoch = 16
    c.data.worker_count = 0
    c.global_batch_size = 8
    c.eval.global_batch_size = 8

    c.optim.scale_lr = False
    c.optim.base_lr = 2e-4
    c.optim.accumulate = 1
    c.pretrain_updates = 150  # plain reconstruction from random init, then EQ-VAE fine-tuning
    c.loss.disc_start = 150
    c.total_updates = 300

    c.checkpoint.every_updates = 100
    c.eval.every_updates = 10_000  # evaluated at the start, after pre-training and at the end
    c.eval.batches = 4
    return c
