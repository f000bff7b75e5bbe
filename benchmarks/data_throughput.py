"""Host-side input throughput: decode + crop to 256 per core, and uint8 vs float32 output.

    python benchmarks/data_throughput.py [--seconds 3]

Photographs: the demo set (eqvae_jax/data/demo_images, 300 px to 1411 px) as shipped, and the same
photographs re-encoded at ImageNet's typical size (500 x 375 JPEG, quality 90). Everything runs in one
thread, so each figure is images/s for one core. Prints a table; never used as a test.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from eqvae_jax.data import demo
from eqvae_jax.data.decode import decode_image
from eqvae_jax.data.transforms import adm_center_crop, eqvae_train_crop


def _photos(imagenet_size: bool) -> list[bytes]:
    files = [demo.IMAGES_DIR / f"{n}.jpg" for n in demo.photo_names()]
    if not imagenet_size:
        return [f.read_bytes() for f in files]
    out = []
    for f in files:
        image = Image.open(f).convert("RGB")
        image = image.resize(
            (500, 375) if image.width >= image.height else (375, 500), Image.Resampling.BICUBIC
        )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _rate(fn: Callable[[bytes, np.random.Generator], object], photos: list[bytes], seconds: float) -> float:
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(photos[done % len(photos)], rng)
        done += 1
    return done / (time.perf_counter() - start)


def _to_float(array: np.ndarray) -> np.ndarray:
    return (array.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    size = args.size
    steps: dict[str, Callable[[bytes, np.random.Generator], object]] = {
        "decode only": lambda b, rng: decode_image(b),
        f"decode + eqvae_train_crop {size}": lambda b, rng: eqvae_train_crop(decode_image(b), size, rng),
        f"decode + eqvae_train_crop {size} + float32": lambda b, rng: _to_float(
            eqvae_train_crop(decode_image(b), size, rng)
        ),
        f"decode + adm_center_crop {size}": lambda b, rng: adm_center_crop(decode_image(b), size),
    }
    print(f"{'photographs':<28} {'step':<44} {'images/s/core':>14}")
    for label, imagenet_size in (("demo set as shipped", False), ("ImageNet-sized 500x375", True)):
        photos = _photos(imagenet_size)
        for name, fn in steps.items():
            print(f"{label:<28} {name:<44} {_rate(fn, photos, args.seconds):>14.1f}")
    image = np.zeros((size, size, 3), np.uint8)
    print(f"bytes per image sent to the device: uint8 {image.nbytes}, float32 {image.nbytes * 4}")


if __name__ == "__main__":
    main()
