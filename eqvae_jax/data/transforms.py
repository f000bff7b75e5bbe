"""Crops that turn a decoded RGB image into a square uint8 array of the target size.

- `eqvae_train_crop`: the EQ-VAE training augmentation (zelaki/eqvae dataset.py): a square crop whose side is
  int(short_side * U(0.5, 1.0)) at a uniformly random position, then an area resize to the target size.
  OpenCV's INTER_AREA is an exact box average when shrinking; PIL's BOX filter computes the same average.
  When the crop is smaller than the target we upsample with bilinear (INTER_AREA upsampling is a
  bilinear-like interpolation in OpenCV; PIL's BOX would be nearest-neighbour). No flip.
- `adm_center_crop`: ADM's `center_crop_arr` (guided-diffusion image_datasets.py; fast-DiT's extraction):
  BOX-halve while the short side is >= 2x the target, BICUBIC resize of the short side to the target, then a
  center crop. Deterministic. The crop of generation and latent extraction.
- `resize_center_crop`: torchvision `Resize(size)` + `CenterCrop(size)`, the reconstruction evaluation of the
  EQ-VAE reference (its eval.py, from LightningDiT). Resize: short side to `size`, long side
  int(size * long / short), bilinear; CenterCrop: top = int(round((h - size) / 2.0)) (Python's round, ties to
  even), the same for left. Deterministic. Done on the PIL image, as torchvision does for PIL input: PIL's
  bilinear filter widens with the downscale factor (antialiased) and rounds to uint8. The reference applied
  ToTensor first, so its float tensor was resized without rounding, antialiased only from torchvision 0.17 on
  (the `antialias=True` default; older versions resized tensors without it); which version its evaluation
  ran is not recorded.
- `resize_random_crop`: torchvision `Resize(size)` + `RandomCrop(size)`, MaskGIT's training augmentation
  (valeoai/Maskgit-pytorch v1, before its RandomHorizontalFlip): the same resize, then a size x size window at
  top ~ U{0..h - size}, left ~ U{0..w - size} (torch.randint's bounds), so only the long side varies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

TRANSFORMS: tuple[str, ...] = ("eqvae_train_crop", "adm_center_crop", "resize_center_crop", "resize_random_crop")
RANDOM_TRANSFORMS: tuple[str, ...] = ("eqvae_train_crop", "resize_random_crop")  # those that use the rng


def eqvae_train_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    min_fraction: float = 0.5,
    max_fraction: float = 1.0,
) -> np.ndarray:
    """Random square crop of min..max of the short side, area-resized to size x size."""
    width, height = image.size
    side = max(1, int(min(width, height) * rng.uniform(min_fraction, max_fraction)))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    if side == size:
        return np.asarray(crop, dtype=np.uint8)
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    return np.asarray(crop.resize((size, size), resample=resample), dtype=np.uint8)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM / guided-diffusion `center_crop_arr`: box-halve, bicubic resize of the short side, center crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def resize_short_side(image: Image.Image, size: int) -> np.ndarray:
    """torchvision `Resize(size)` of a PIL image: short side to `size`, long side int(size * long / short),
    bilinear (PIL's, antialiased), as uint8 HWC."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        image = image.resize(new_size, resample=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """torchvision Resize(size) + CenterCrop(size) of a PIL image (bilinear, antialiased; module docstring)."""
    array = resize_short_side(image, size)
    top = int(round((array.shape[0] - size) / 2.0))
    left = int(round((array.shape[1] - size) / 2.0))
    return array[top : top + size, left : left + size]


def resize_random_crop(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision Resize(size) + RandomCrop(size): a uniformly placed size x size window of the resized image."""
    array = resize_short_side(image, size)
    top = int(rng.integers(0, array.shape[0] - size + 1))
    left = int(rng.integers(0, array.shape[1] - size + 1))
    return array[top : top + size, left : left + size]


def random_flip(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2 (HWC)."""
    return array[:, ::-1] if rng.random() < 0.5 else array


CropFn = Callable[[Image.Image, np.random.Generator], np.ndarray]


class Crop:
    """A picklable crop (+ optional flip) by name: crop(image, rng) -> (size, size, 3) uint8."""

    def __init__(
        self,
        name: str,
        size: int,
        flip: bool = False,
        min_fraction: float = 0.5,
        max_fraction: float = 1.0,
    ) -> None:
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")
        if not 0.0 < min_fraction <= max_fraction <= 1.0:
            raise ValueError(
                f"crop fractions must satisfy 0 < min <= max <= 1, got {min_fraction}, {max_fraction}"
            )
        self.name, self.size, self.flip = name, size, flip
        self.min_fraction, self.max_fraction = min_fraction, max_fraction

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if self.name == "eqvae_train_crop":
            array = eqvae_train_crop(image, self.size, rng, self.min_fraction, self.max_fraction)
        elif self.name == "resize_center_crop":
            array = resize_center_crop(image, self.size)
        elif self.name == "resize_random_crop":
            array = resize_random_crop(image, self.size, rng)
        else:
            array = adm_center_crop(image, self.size)
        if self.flip:
            array = random_flip(array, rng)
        return np.ascontiguousarray(array)
