"""Image grids for summaries, sample sheets and the data CLI (uint8 HWC, ready for PNG or TensorBoard).

Ground floor (numpy only): samplers, jobs and CLIs of every layer draw their grids with it."""

from __future__ import annotations

import math

import numpy as np


def from_unit_range(images: np.ndarray) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def square_grid(images: np.ndarray, max_images: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid of the first `max_images`, near square."""
    images = np.asarray(images)[:max_images]
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, cols * w, images.shape[3]), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid


def row_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of NHWC float images in [0, 1] (each row may have its own image size) -> one uint8 HWC grid on white."""
    height = max(r.shape[1] for r in rows)
    width = max(r.shape[0] * (r.shape[2] + pad) for r in rows)
    grid = np.ones((len(rows) * (height + pad), width, 3), np.float32)
    for i, row in enumerate(rows):
        y = i * (height + pad)
        for j, img in enumerate(row):
            x = j * (img.shape[1] + pad)
            grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return (grid * 255.0 + 0.5).astype(np.uint8)
