"""Cache extraction: encode a dataset once into a latent cache (KL autoencoder) or a token cache (VQ autoencoder)."""
