"""torchvision.transforms.functional's `resize` and `center_crop` for PIL images, transcribed (PyPI torchvision
does not import beside the CPU torch wheel here).

Follows torchvision (v0.15-0.20 `transforms/functional.py` and `functional_pil.py`) statement by statement for
the PIL path: `_compute_resized_output_size` (an int or 1-element size is the short side; the long side is
int(size * long / short)), `resize` (unchanged when the size already matches, else PIL `Image.resize` with
the interpolation mapped to PIL's filter), `center_crop` (zero padding when the crop is larger than the image,
then `crop` at top = int(round((h - crop_h) / 2.0)), left likewise), `crop` (PIL `Image.crop` box).
`Resize(256)` + `CenterCrop(256)` (the EQ-VAE reference's evaluation transform) is `resize_center_crop`.
"""

from __future__ import annotations

import numbers

from PIL import Image, ImageOps

PIL_MODES = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def get_dimensions(img: Image.Image) -> list[int]:
    width, height = img.size
    return [len(img.getbands()), height, width]


def _compute_resized_output_size(image_size: tuple[int, int], size: list[int], max_size: int | None = None):
    h, w = image_size
    short, long = (w, h) if w <= h else (h, w)
    if len(size) == 1:
        requested_new_short = size if isinstance(size, int) else size[0]
        new_short, new_long = requested_new_short, int(requested_new_short * long / short)
        if max_size is not None:
            if max_size <= requested_new_short:
                raise ValueError("max_size must be strictly greater than the requested size of the smaller edge")
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w, new_h = size[1], size[0]
    return [new_h, new_w]


def resize(img: Image.Image, size, interpolation: str = "bilinear", max_size: int | None = None) -> Image.Image:
    _, image_height, image_width = get_dimensions(img)
    if isinstance(size, int):
        size = [size]
    output_size = _compute_resized_output_size((image_height, image_width), size, max_size)
    if [image_height, image_width] == output_size:
        return img
    return img.resize(tuple(output_size[::-1]), PIL_MODES[interpolation])  # functional_pil.resize


def pad(img: Image.Image, padding_ltrb: list[int], fill: int = 0) -> Image.Image:
    left, top, right, bottom = padding_ltrb
    return ImageOps.expand(img, border=(left, top, right, bottom), fill=fill)


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return img.crop((left, top, left + width, top + height))


def center_crop(img: Image.Image, output_size) -> Image.Image:
    if isinstance(output_size, numbers.Number):
        output_size = (int(output_size), int(output_size))
    elif isinstance(output_size, tuple | list) and len(output_size) == 1:
        output_size = (output_size[0], output_size[0])
    _, image_height, image_width = get_dimensions(img)
    crop_height, crop_width = output_size
    if crop_width > image_width or crop_height > image_height:
        padding_ltrb = [
            (crop_width - image_width) // 2 if crop_width > image_width else 0,
            (crop_height - image_height) // 2 if crop_height > image_height else 0,
            (crop_width - image_width + 1) // 2 if crop_width > image_width else 0,
            (crop_height - image_height + 1) // 2 if crop_height > image_height else 0,
        ]
        img = pad(img, padding_ltrb, fill=0)
        _, image_height, image_width = get_dimensions(img)
        if crop_width == image_width and crop_height == image_height:
            return img
    crop_top = int(round((image_height - crop_height) / 2.0))
    crop_left = int(round((image_width - crop_width) / 2.0))
    return crop(img, crop_top, crop_left, crop_height, crop_width)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """transforms.Compose([Resize(size), CenterCrop(size)]) on a PIL image."""
    return center_crop(resize(img, size), size)
