"""PyTorch <-> Flax weight conversion with explicit key maps: `python -m eqvae_jax.convert --kind K ...`."""
