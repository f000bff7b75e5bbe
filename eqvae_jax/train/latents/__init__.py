"""Latent extraction: encode a dataset once into a latent cache (config + job)."""
