"""eqvae_jax.eval."""
