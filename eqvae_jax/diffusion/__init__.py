"""eqvae_jax.diffusion."""
