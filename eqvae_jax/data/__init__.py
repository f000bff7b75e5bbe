"""eqvae_jax.data."""
