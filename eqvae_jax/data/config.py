"""The data config schema. Job configs: `config.data = eqvae_jax.data.config.get_config()`, then override."""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Defaults: ImageNet from TFDS ArrayRecord, EQ-VAE training crop at 256, ADM center crop for eval."""
    c = ml_collections.ConfigDict()
    # Source: 'tfds' (any TFDS dataset prepared as ArrayRecord, default imagenet2012), 'folder' (a directory
    # searched recursively for jpg/jpeg/png/webp) or 'demo' (the photographs shipped in data/demo_images,
    # prepared into `data_dir` as a TFDS ArrayRecord dataset on first use).
    c.source = "tfds"
    c.data_dir = ""  # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets ('demo': data_cache/tfds)
    c.tfds_name = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"  # held-out split for periodic eval ('tfds' and 'demo')
    c.folder = ""  # 'folder' source: training images
    c.eval_folder = ""  # 'folder' source: held-out images ('' = no eval set)
    c.label_from_parent = True  # 'folder': label = index of the parent folder name (sorted); else -1

    # Per-image transform. Training: 'eqvae_train_crop' (reference EQ-VAE fine-tuning) or 'adm_center_crop'.
    c.image_size = 256
    c.transform = "eqvae_train_crop"
    c.eval_transform = "adm_center_crop"
    c.crop_min_fraction = 0.5  # eqvae_train_crop: side = short_side * U(min, max)
    c.crop_max_fraction = 1.0
    c.flip = False  # random horizontal flip (training only; the EQ-VAE recipe has none)
    c.min_side = 16  # images whose short side is below this are skipped ('too_small'); others are resized

    # Order and epochs.
    c.seed = 0
    c.shuffle = True  # seeded global shuffle, reshuffled every epoch
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
    c.repeats_per_epoch = 1  # each image appears this many times per epoch (different random crops)
    c.drop_remainder = True  # training: drop a last partial batch of a finite run

    # Batching. The per-process batch is global_batch_size / process_count.
    c.global_batch_size = 256
    c.eval_global_batch_size = 0  # 0 = global_batch_size

    # Throughput.
    c.worker_count = 8  # Grain worker processes (decode + crop); 0 = in the main process
    c.worker_buffer_size = 2  # batches each worker keeps ready
    c.read_threads = 4  # threads per worker reading + decoding elements (PIL releases the GIL)
    c.read_buffer_size = 64  # elements each worker reads ahead
    c.prefetch = 2  # global batches already transferred to the devices
    # 'uint8': hosts send uint8 and the devices scale to [-1, 1] (4x less host traffic; measured faster);
    # 'float32': the workers scale. Either way batch['image'] arrives as float32 in [-1, 1].
    c.output_dtype = "uint8"
    c.max_consecutive_skips = 10_000  # give up (clear error) when a source yields nothing decodable
    return c
