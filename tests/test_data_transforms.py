"""Crops and decoding: the EQ-VAE training crop, the ADM center crop, torchvision's Resize + CenterCrop (the
reference's reconstruction evaluation), and every kind of bad input."""

import io

import numpy as np
import pytest
import torchvision_functional  # torchvision's functional resize / center_crop for PIL input, transcribed
from PIL import Image

from eqvae_jax.data.config import DataConfig
from eqvae_jax.data.decode import SkipImage, decode_image
from eqvae_jax.data.transforms import (
    Crop,
    adm_center_crop,
    eqvae_train_crop,
    resize_center_crop,
    resize_random_crop,
)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _coordinates(width: int, height: int) -> Image.Image:
    """R = x, G = y, so a crop reveals where it was taken."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_train_crop_is_a_random_square_of_half_to_all_of_the_short_side():
    image = _coordinates(250, 200)
    rng = np.random.default_rng(0)
    lefts, tops = set(), set()
    for _ in range(200):  # size == side: no resize, so the crop's pixels are the source coordinates
        out = eqvae_train_crop(image, 100, rng, min_fraction=0.5, max_fraction=0.5)
        assert out.shape == (100, 100, 3) and out.dtype == np.uint8
        left, top = int(out[0, 0, 0]), int(out[0, 0, 1])
        np.testing.assert_array_equal(out[0, :, 0], np.arange(left, left + 100))
        np.testing.assert_array_equal(out[:, 0, 1], np.arange(top, top + 100))
        lefts.add(left)
        tops.add(top)
    assert min(lefts) < 20 and max(lefts) > 130 and max(lefts) <= 150
    assert min(tops) < 20 and max(tops) > 80 and max(tops) <= 100


def test_train_crop_side_fraction_range():
    image = Image.new("RGB", (300, 200))
    rng = np.random.default_rng(1)
    sides = []
    for _ in range(300):
        state = rng.bit_generator.state
        eqvae_train_crop(image, 32, rng)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        sides.append(int(200 * replay.uniform(0.5, 1.0)))
    assert 100 <= min(sides) < 110 and 190 < max(sides) <= 200


def test_train_crop_area_resize_is_the_box_average():
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = eqvae_train_crop(Image.fromarray(pixels), 32, np.random.default_rng(0), 1.0, 1.0)
    expected = pixels.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0


def _adm_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion image_datasets.center_crop_arr, verbatim apart from names."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(517, 389), (40, 90), (256, 256), (1030, 700)])
def test_adm_center_crop_matches_reference(size):
    pixels = np.random.default_rng(3).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(adm_center_crop(image, 64), _adm_reference(image, 64))


@pytest.mark.parametrize("size", [(517, 389), (389, 517), (1030, 700), (40, 90), (64, 64), (67, 64), (64, 66)])
def test_resize_center_crop_matches_torchvision(size):
    pixels = np.random.default_rng(5).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = resize_center_crop(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(torchvision_functional.resize_center_crop(image, 64)))


@pytest.mark.parametrize("width, left", [(64, 0), (65, 0), (66, 1), (67, 2), (69, 2), (100, 18)])
def test_resize_center_crop_offsets_round_half_to_even(width, left):
    """Short side already the size: no resize, the crop starts at int(round((w - 64) / 2.0))."""
    out = resize_center_crop(_coordinates(width, 64), 64)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(left, left + 64))
    np.testing.assert_array_equal(out[:, 0, 1], np.arange(64))


def test_resize_center_crop_resizes_the_short_side_bilinear():
    pixels = np.random.default_rng(6).integers(0, 256, (96, 128, 3), dtype=np.uint8)  # h 96, w 128
    # short side 96 -> 64, long side int(64 * 128 / 96) = 85; left = int(round(21 / 2.0)) = 10, top 0
    expected = np.asarray(Image.fromarray(pixels).resize((85, 64), Image.Resampling.BILINEAR))[:, 10:74]
    np.testing.assert_array_equal(resize_center_crop(Image.fromarray(pixels), 64), expected)
    assert DataConfig().eval_transform == "resize_center_crop"  # the reconstruction evaluation's default
    np.testing.assert_array_equal(Crop("resize_center_crop", 64)(Image.fromarray(pixels), None), expected)


def test_resize_random_crop_is_a_uniform_window_of_the_resized_image():
    """torchvision Resize + RandomCrop (MaskGIT's training crop): the resize of resize_center_crop, then every
    offset 0..w - size along the long side, none along the short one."""
    pixels = np.random.default_rng(7).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(pixels).resize((85, 64), Image.Resampling.BILINEAR))  # as above
    rng = np.random.default_rng(0)
    lefts = set()
    for _ in range(400):
        out = resize_random_crop(Image.fromarray(pixels), 64, rng)
        left = next(x for x in range(22) if np.array_equal(out, resized[:, x: x + 64]))
        lefts.add(left)
    assert lefts == set(range(22))  # 85 - 64 + 1 offsets, all reached
    square = _coordinates(64, 64)
    np.testing.assert_array_equal(Crop("resize_random_crop", 64)(square, rng), np.asarray(square))


def test_flip_is_horizontal_and_optional():
    image = _coordinates(64, 64)
    flipped = Crop("adm_center_crop", 64, flip=True)
    outs = [flipped(image, np.random.default_rng(s)) for s in range(8)]
    assert any(o[0, 0, 0] == 63 for o in outs) and any(o[0, 0, 0] == 0 for o in outs)
    for o in outs:
        assert o[0, 0, 1] == 0  # rows are never flipped
    plain = Crop("adm_center_crop", 64)
    assert all(plain(image, np.random.default_rng(s))[0, 0, 0] == 0 for s in range(8))
    with pytest.raises(ValueError, match="unknown transform"):
        Crop("center", 64)


def test_decode_converts_modes_to_rgb():
    gray = Image.fromarray(np.full((20, 30), 77, np.uint8), "L")
    out = np.asarray(decode_image(_encode(gray, "JPEG")))
    assert out.shape == (20, 30, 3) and (out[..., 0] == out[..., 1]).all()

    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_encode(cmyk, "JPEG", quality=95)))
    assert out.shape == (24, 24, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60

    palette = Image.new("RGB", (24, 24), (0, 0, 255)).convert("P")
    assert np.asarray(decode_image(_encode(palette, "PNG")))[0, 0].tolist() == [0, 0, 255]

    rgba = Image.new("RGBA", (24, 24), (255, 0, 0, 0))  # fully transparent: composited over white
    assert np.asarray(decode_image(_encode(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]
    la = Image.new("LA", (24, 24), (0, 255))
    assert np.asarray(decode_image(_encode(la, "PNG")))[0, 0].tolist() == [0, 0, 0]

    transparent_palette = Image.new("P", (24, 24), 0)
    transparent_palette.putpalette([10, 20, 30] * 256)
    assert np.asarray(decode_image(_encode(transparent_palette, "PNG", transparency=0)))[0, 0].tolist() == [
        255,
        255,
        255,
    ]

    sixteen = Image.fromarray(np.full((24, 24), 65535, np.uint16))
    assert np.asarray(decode_image(_encode(sixteen, "PNG")))[0, 0].tolist() == [255, 255, 255]

    webp = Image.new("RGB", (24, 24), (0, 128, 0))
    assert decode_image(_encode(webp, "WEBP", lossless=True)).size == (24, 24)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "corrupt"),
        (b"this is not an image at all", "corrupt"),
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "truncated"),
        ("tiny", "too_small"),
    ],
)
def test_decode_names_why_an_image_is_unusable(data, reason):
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    if data == "truncated_jpeg":
        full = _encode(photo, "JPEG")
        data = full[: len(full) // 2]
    elif data == "truncated_png":
        full = _encode(photo, "PNG")
        data = full[: len(full) // 2]
    elif data == "tiny":
        data = _encode(photo.resize((4, 4)), "PNG")
    with pytest.raises(SkipImage) as info:
        decode_image(data, min_side=8)
    assert info.value.reason == reason
