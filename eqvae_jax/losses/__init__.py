"""eqvae_jax.losses: the EQ-VAE objective as pure functions.

resample        PyTorch-exact bilinear resize (no antialias) and quarter-turn rotations (static or traced)
reconstruction  NLL (L1 + broadcast LPIPS, frozen logvar, sum / B) and KL reductions
gan             hinge / vanilla D loss, generator loss, adaptive weight, disc_start warm-up
nnx_vjp         VJPs through NNX modules (last-layer gradients without a second full backward)
autoencoder     LossConfig, generator_loss, discriminator_loss (LDM LPIPSWithDiscriminator), the adaptive weight per
                group of the batch (grouped_adaptive_weight: one per GPU in the reference's DDP)
equivariance    TransformConfig, TransformSampler, BranchPlan, reconstruct_transformed,
                transformed_generator_loss
"""
