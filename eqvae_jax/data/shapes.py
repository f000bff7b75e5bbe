"""`shapes`: a procedural class-conditional image dataset that needs no download.

Eight classes of filled figures (disc, ring, square, triangle, star, cross, hexagon, crescent) with a random
colour, size, rotation and position, on a random smooth (two-colour gradient) or textured (a few random
low-frequency waves) background. Every image is a pure function of (seed, split, index): any process, Grain
worker or rerun renders the same pixels, at any resolution (figures are anti-aliased by 4x supersampling).

Rotation and scale variation is native to this domain: every class appears at every angle and over a 2.3x
range of sizes, so an autoencoder trained on it sees the transforms EQ-VAE regularises, and a generative model
has to learn the figure up to exactly these transforms.

The train split is effectively infinite (`train_size` records, 2**24 by default, never repeated in practice);
the held-out split is a fixed, disjoint stream (`eval_size` records). Labels cycle through the classes
(index % 8), so every prefix of 8k records is exactly balanced.

As a source, records are PNG bytes (lossless) like any encoded image, decoded in the Grain workers by the
same code as photographs (`data.source='shapes'`).
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

CLASSES: tuple[str, ...] = ("disc", "ring", "square", "triangle", "star", "cross", "hexagon", "crescent")
SPLITS = {"train": 0, "validation": 1}
SUPERSAMPLE = 4
RADIUS = (0.15, 0.35)  # figure radius as a fraction of the image side
CENTRE = (0.3, 0.7)  # figure centre as a fraction of the image side (the figure stays inside)


def _polygon(rho: np.ndarray, phi: np.ndarray, sides: int, radius: float) -> np.ndarray:
    """Inside a regular polygon with `sides` corners on the circle of `radius` (one corner at phi = 0)."""
    sector = 2 * np.pi / sides
    return rho * np.cos(np.mod(phi, sector) - sector / 2) <= radius * np.cos(sector / 2)


def _star(rho: np.ndarray, phi: np.ndarray, points: int = 5, inner: float = 0.42) -> np.ndarray:
    """Inside a star: the boundary radius goes linearly from 1 (tips) to `inner` (notches) and back."""
    sector = 2 * np.pi / points
    t = np.abs(np.mod(phi, sector) / sector - 0.5) * 2  # 1 at a tip, 0 at a notch
    return rho <= inner + (1 - inner) * t


def figure_mask(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of figure `name` in its own frame: unit circumradius, centred, unrotated."""
    rho, phi = np.hypot(x, y), np.arctan2(y, x)
    if name == "disc":
        return rho <= 1
    if name == "ring":
        return (rho <= 1) & (rho >= 0.6)
    if name == "square":
        return _polygon(rho, phi + np.pi / 4, 4, 1.0)  # axis-aligned in its own frame
    if name == "triangle":
        return _polygon(rho, phi + np.pi / 2, 3, 1.0)
    if name == "star":
        return _star(rho, phi + np.pi / 2)
    if name == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    if name == "hexagon":
        return _polygon(rho, phi, 6, 1.0)
    if name == "crescent":
        return (rho <= 1) & (np.hypot(x - 0.5, y) >= 0.8)
    raise ValueError(f"unknown figure {name!r}; expected one of {CLASSES}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {sorted(SPLITS)}, not {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, 3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: a two-colour linear gradient or a few random waves (textured)."""
    u = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(u, u, indexing="xy")
    if rng.random() < 0.5:  # smooth
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) * 1.4 + 0.5, 0, 1)[..., None]
        a, b = _colour(rng), _colour(rng)
        return a * (1 - t) + b * t
    base = _colour(rng)
    waves = np.zeros((size, size, 3))
    for _ in range(3):  # textured: random low-frequency plane waves, each with its own colour direction
        freq, angle, phase = rng.uniform(2, 8), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
        waves += wave[..., None] * rng.uniform(-0.15, 0.15, 3)
    return np.clip(base + waves, 0, 1)


def render(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
    """(uint8 (size, size, 3) image, label) of record `index` of `split`."""
    if size < 8:
        raise ValueError(f"shapes images need at least 8 px, got {size}")
    rng = _rng(seed, split, index)
    label = index % len(CLASSES)
    background = _background(rng, size)
    colour = _colour(rng)
    while np.abs(colour - background.mean((0, 1))).sum() < 0.6:  # keep the figure visible
        colour = _colour(rng)
    radius = rng.uniform(*RADIUS)
    cx, cy = rng.uniform(*CENTRE, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    # Coverage of each pixel by the figure, from SUPERSAMPLE^2 samples, over the figure's bounding box only.
    lo = np.clip(np.floor((np.array([cx, cy]) - radius) * size).astype(int), 0, size)
    hi = np.clip(np.ceil((np.array([cx, cy]) + radius) * size).astype(int), 0, size)
    ux = (np.arange(lo[0] * SUPERSAMPLE, hi[0] * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE)
    uy = (np.arange(lo[1] * SUPERSAMPLE, hi[1] * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE)
    x, y = np.meshgrid(ux, uy, indexing="xy")
    dx, dy = (x - cx) / radius, (y - cy) / radius
    c, s = np.cos(angle), np.sin(angle)
    mask = figure_mask(CLASSES[label], c * dx + s * dy, -s * dx + c * dy)
    h, w = hi[1] - lo[1], hi[0] - lo[0]
    coverage = np.zeros((size, size, 1))
    coverage[lo[1]:hi[1], lo[0]:hi[0], 0] = mask.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean((1, 3))
    image = background * (1 - coverage) + colour * coverage
    return np.round(image * 255).astype(np.uint8), label


class ShapesSource:
    """Split `split` of `shapes` as a random-access source of PNG records (`data/sources.py` protocol)."""

    def __init__(self, split: str, size: int, length: int, seed: int = 0) -> None:
        _rng(seed, split, 0)  # validates the split
        if length < 1 or size < 8:
            raise ValueError(f"shapes source needs length >= 1 and size >= 8, got {length} and {size}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.class_names = list(CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes {self.split} has {self.length} records, no {index}")
        image, label = render(self.seed, self.split, int(index), self.size)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue(), "label": label, "name": f"shapes-{self.split}-{index}",
                "unreadable": False}

    def __repr__(self) -> str:
        return f"ShapesSource({self.split!r}, {self.size} px, {self.length} records, seed {self.seed})"


def fingerprint(seed: int, size: int) -> int:
    """A checksum of the first record of each class (a cheap check that rendering did not change)."""
    h = 0
    for index in range(len(CLASSES)):
        h = zlib.crc32(render(seed, "train", index, size)[0].tobytes(), h)
    return h
