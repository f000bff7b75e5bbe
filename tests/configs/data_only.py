"""A data-only job config for the `python -m eqvae_jax.data` test: the demo set at 32 px, no workers."""

import ml_collections

from eqvae_jax.data import config as data_config


def get_config() -> ml_collections.ConfigDict:
    """Demo source, tiny batches, everything in the main process."""
    config = ml_collections.ConfigDict()
    config.data = data_config.get_config()
    config.data.source = "demo"
    config.data.data_dir = "data_cache/tfds"
    config.data.image_size = 32
    config.global_batch_size = 8
    config.data.repeats_per_epoch = 4
    config.data.worker_count = 0
    config.data.read_threads = 1
    return config
