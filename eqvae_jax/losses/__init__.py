"""eqvae_jax.losses: the EQ-VAE objective as pure functions.

resample        PyTorch-exact bilinear resize (no antialias) and quarter-turn rotations (static or traced)
reconstruction  NLL (L1 + broadcast LPIPS, frozen logvar, sum / B) and KL reductions
gan             hinge / vanilla D loss, generator loss, adaptive weight, disc_start warm-up
nnx_vjp         VJPs through NNX modules (last-layer gradients without a second full backward)
autoencoder     LossConfig, generator_loss, discriminator_loss (LDM LPIPSWithDiscriminator), the
                adversarial_generator_loss both objectives share (nll, adaptive weight, GAN term) and the
                adaptive weight per group of the batch (grouped_adaptive_weight: one per GPU in the reference's DDP)
vq              VQLossConfig, vq_generator_loss (taming VQLPIPSWithDiscriminator: mean nll, codebook term)
equivariance    TransformConfig, TransformSampler, BranchPlan, reconstruct_transformed,
                transformed_generator_loss, and for VQ models reconstruct_transformed_vq,
                transformed_vq_generator_loss
"""
