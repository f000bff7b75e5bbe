"""The one-command small-scale replication of EQ-VAE's chain on the `shapes` domain (docs/replication.md):
python -m eqvae_jax.replicate --config=configs/replicate.py --workdir=DIR."""
