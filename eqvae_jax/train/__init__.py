"""eqvae_jax.train."""
