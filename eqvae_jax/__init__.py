"""eqvae-jax: EQ-VAE (equivariance-regularized autoencoder latents) and latent generative models in JAX."""

__version__ = "0.1.0"
