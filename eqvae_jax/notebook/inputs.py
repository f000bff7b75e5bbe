"""Images for the notebooks: the embedded demo photographs or the user's files, checked before anything runs.

Every image is decoded by the training pipeline's decoder (`data.decode`: alpha over white, CMYK, palette and
16-bit images converted) and cut to a square with ADM's deterministic center crop (`data.transforms`), then
scaled to float32 NHWC in [-1, 1], the autoencoders' input. A file that is not a readable image is refused by
name (`NotAnImageError`) and nothing is used or written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from eqvae_jax.data import demo
from eqvae_jax.data.decode import SkipImage, decode_image
from eqvae_jax.data.sources import IMAGE_EXTENSIONS
from eqvae_jax.data.transforms import adm_center_crop
from eqvae_jax.notebook.errors import NotAnImageError

# Skip reasons of data.decode whose detail is PIL's internals; too_small and unsupported_mode keep their detail.
_WHY = {"unreadable": "unreadable", "corrupt": "not an image file, or a corrupt one", "truncated": "truncated"}


def _check(files: Mapping[str, bytes]) -> dict:
    decoded, bad = {}, []
    for name, data in files.items():
        try:
            decoded[name] = decode_image(bytes(data))
        except SkipImage as e:
            bad.append(f"{name} ({_WHY.get(e.reason, e)})")
    if bad:
        raise NotAnImageError(f"not an image: {'; '.join(bad)}. Upload JPEG, PNG or WebP files.")
    if not decoded:
        raise NotAnImageError("no images given.")
    return decoded


def images_from_files(files: Mapping[str, bytes], size: int) -> tuple[np.ndarray, list[str]]:
    """({name: encoded bytes}, side) -> (float32 (N, size, size, 3) in [-1, 1], names); NotAnImageError names
    every file that is not a readable image."""
    decoded = _check(files)
    images = np.stack([adm_center_crop(image, size) for image in decoded.values()])
    return images.astype(np.float32) / 127.5 - 1.0, list(decoded)


def demo_images(size: int, count: int | None = None, names: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """The embedded demo photographs (`names`, or the first `count` in sorted order) as `images_from_files`."""
    available = demo.photo_names()
    chosen = list(names) or available[:count]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ValueError(f"unknown demo photographs {unknown}; available: {', '.join(available)}.")
    return images_from_files({n: (demo.IMAGES_DIR / f"{n}.jpg").read_bytes() for n in chosen}, size)


def save_image_folder(files: Mapping[str, bytes], folder: str) -> list[str]:
    """Write uploaded images into `folder` (a training folder for `--config.data.source=folder`) after checking
    that every one is a readable image; returns the written paths. Nothing is written if one is not."""
    _check(files)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, data in files.items():
        stem, ext = os.path.splitext(os.path.basename(name))
        path = os.path.join(folder, stem + (ext if ext.lower() in IMAGE_EXTENSIONS else ".png"))
        if ext.lower() not in IMAGE_EXTENSIONS:  # e.g. .bmp or .tif: the folder source reads jpg/png/webp only
            decode_image(bytes(data)).save(path)
        else:
            with open(path, "wb") as f:
                f.write(bytes(data))
        paths.append(path)
    return paths
