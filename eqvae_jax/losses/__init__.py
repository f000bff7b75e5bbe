"""eqvae_jax.losses."""
