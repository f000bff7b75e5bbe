"""The `data` section of image jobs: a typed schema with ImageNet/EQ-VAE defaults.

Job schemas hold a `DataConfig`; `get_config()` is the same as a ConfigDict (every key present) for config
files and tests, and `as_data_config` accepts either, so the pipeline always reads one typed section.
The batch size is not here: it is the job's `global_batch_size` (images per step over all hosts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from eqvae_jax.data.transforms import TRANSFORMS
from eqvae_jax.typed_config import default_config, parse

SOURCES = ("tfds", "folder", "demo", "shapes")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Source: 'tfds' (any TFDS dataset prepared as ArrayRecord, default imagenet2012), 'folder' (a directory
    # searched recursively for jpg/jpeg/png/webp) or 'demo' (the photographs shipped in data/demo_images,
    # prepared into `data_dir` as a TFDS ArrayRecord dataset on first use).
    source: str = "tfds"
    data_dir: str = ""  # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets ('demo': sources.cache_dir()/tfds)
    tfds_name: str = "imagenet2012"
    train_split: str = "train"
    eval_split: str = "validation"  # held-out split for evaluation ('tfds' and 'demo')
    folder: str = ""  # 'folder' source: training images
    eval_folder: str = ""  # 'folder' source: held-out images ('' = no eval set)
    label_from_parent: bool = True  # 'folder': label = index of the parent folder name (sorted); else -1
    # 'shapes' (data/shapes.py): procedural figures rendered from (seed, split, index), no files at all.
    shapes_seed: int = 0
    shapes_size: int = 0  # rendering resolution; 0 = image_size
    shapes_train_size: int = 1 << 24  # records in the train split (effectively infinite)
    shapes_eval_size: int = 1000  # records in the held-out 'validation' split

    # Per-image transforms (data/transforms.py TRANSFORMS). Training: 'eqvae_train_crop' (reference EQ-VAE
    # fine-tuning) or 'adm_center_crop' (DiT latents, generation). Held-out reconstruction evaluation:
    # 'resize_center_crop' (torchvision Resize + CenterCrop, the reference's eval.py).
    image_size: int = 256
    transform: str = "eqvae_train_crop"
    eval_transform: str = "resize_center_crop"
    crop_min_fraction: float = 0.5  # eqvae_train_crop: side = short_side * U(min, max)
    crop_max_fraction: float = 1.0
    flip: bool = False  # random horizontal flip (training only; the EQ-VAE recipe has none)
    min_side: int = 16  # images whose short side is below this are skipped ('too_small'); others are resized

    # Order and epochs.
    seed: int = 0
    shuffle: bool = True  # seeded global shuffle, reshuffled every epoch
    num_epochs: int | None = None  # None = repeat forever
    repeats_per_epoch: int = 1  # each image appears this many times per epoch (different random crops)
    drop_remainder: bool = True  # training: drop a last partial batch of a finite run

    # Throughput.
    worker_count: int = 8  # Grain worker processes (decode + crop); 0 = in the main process
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 4  # threads per worker reading + decoding elements (PIL releases the GIL)
    read_buffer_size: int = 64  # elements each worker reads ahead
    prefetch: int = 2  # global batches already transferred to the devices
    # 'uint8': hosts send uint8 and the devices scale to [-1, 1] (4x less host traffic; measured faster);
    # 'float32': the workers scale. Either way batch['image'] arrives as float32 in [-1, 1].
    output_dtype: str = "uint8"
    max_consecutive_skips: int = 10_000  # give up (clear error) when a source yields nothing decodable

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when nothing)."""
        out = []
        if self.source not in SOURCES:
            out.append(f"data.source must be one of {SOURCES}, not {self.source!r}")
        for name in ("transform", "eval_transform"):
            if getattr(self, name) not in TRANSFORMS:
                out.append(f"data.{name} must be one of {TRANSFORMS}, not {getattr(self, name)!r}")
        if self.output_dtype not in ("uint8", "float32"):
            out.append(f"data.output_dtype must be 'uint8' or 'float32', not {self.output_dtype!r}")
        for name in ("image_size", "shapes_train_size", "shapes_eval_size"):
            if getattr(self, name) < 1:
                out.append(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.shapes_size < 0 or 0 < self.shapes_size < 8:
            out.append(f"data.shapes_size must be 0 (= image_size) or at least 8, got {self.shapes_size}")
        if not 0 < self.crop_min_fraction <= self.crop_max_fraction <= 1:
            out.append("need 0 < data.crop_min_fraction <= data.crop_max_fraction <= 1")
        return out


def get_config() -> ml_collections.ConfigDict:
    """The defaults as a ConfigDict (for config files and tests)."""
    return default_config(DataConfig)


def as_data_config(config: DataConfig | ml_collections.ConfigDict | Any) -> DataConfig:
    """A typed data section from a DataConfig (returned as is) or a ConfigDict/mapping (parsed)."""
    return config if isinstance(config, DataConfig) else parse(DataConfig, config, "data")
