"""Decode encoded image bytes to RGB uint8, converting what can be converted and naming why the rest cannot.

Every input either becomes an (H, W, 3) uint8 array or a skip reason from SKIP_REASONS; nothing raises, so a
bad file never stops the pipeline (the pipeline counts and logs the reasons).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Reasons an image is skipped; the index of a reason is its code in the pipeline's per-batch counters.
SKIP_REASONS: tuple[str, ...] = ("unreadable", "corrupt", "truncated", "too_small", "unsupported_mode")

# Alpha is composited over white: a transparent background becomes the usual white page, not black.
_BACKGROUND = (255, 255, 255)

# PIL's warnings while decoding (e.g. "Palette images with transparency", corrupt EXIF) are noise here. A filter
# by module, set once: `warnings.catch_warnings()` is not thread-safe before Python 3.14, and the pipeline decodes
# in threads, so entering and leaving it there leaked a global "ignore everything" into the process's filters.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


class SkipImage(Exception):
    """An image that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def skip_code(reason: str) -> int:
    """The integer code of a skip reason (its index in SKIP_REASONS)."""
    return SKIP_REASONS.index(reason)


def _open(data: bytes) -> Image.Image:
    """Open and fully decode, mapping PIL's failures to skip reasons."""
    if not data:
        raise SkipImage("corrupt", "empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half grey
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as e:
        raise SkipImage("corrupt", str(e)) from None
    except Image.DecompressionBombError as e:
        raise SkipImage("corrupt", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "corrupt"
        raise SkipImage(reason, str(e)) from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL mode we understand to RGB (alpha over white, CMYK, palette, 16-bit, bilevel)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale, e.g. 16-bit PNG: 65535 -> 255
        gray = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    raise SkipImage("unsupported_mode", mode)


def decode_image(data: bytes, min_side: int = 1) -> Image.Image:
    """Decode bytes to an RGB PIL image whose short side is at least `min_side`; raises SkipImage."""
    image = _open(data)
    try:
        image = _to_rgb(image)
    except (OSError, ValueError) as e:
        raise SkipImage("unsupported_mode", f"{image.mode}: {e}") from None
    if min(image.size) < max(min_side, 1):
        raise SkipImage("too_small", f"{image.size[0]}x{image.size[1]} < {min_side}")
    return image
