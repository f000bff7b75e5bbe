"""eqvae_jax.parallel."""
