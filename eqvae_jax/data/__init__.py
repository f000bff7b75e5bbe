"""eqvae_jax.data: Grain input pipelines for TFDS ArrayRecord (ImageNet), image folders and the demo set.

Modules: config (the data config schema), sources (TFDS split / folder), demo (the shipped photographs as a
TFDS dataset), imagenet (TF-free ImageNet preparation), decode (bytes -> RGB, skip reasons), transforms
(EQ-VAE training crop, ADM center crop), pipeline (Grain datasets per process), iterator (global sharded
batches with checkpointable state), latent_cache (the latent / token cache files and their readers),
tfds_prepare (TFDS preparation safe against other processes); `python -m eqvae_jax.data` (__main__) runs a
job's input pipeline alone. Importing the package has no side effects.
"""
