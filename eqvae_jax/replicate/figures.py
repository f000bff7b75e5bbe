"""The report's pictures, drawn with PIL (matplotlib is a dev-only dependency): a line chart with min-max bands,
labelled image panels. Everything returns uint8 HWC arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eqvae_jax.images import row_grid

COLOURS = {"eq": (31, 119, 180), "control": (214, 39, 40)}
FALLBACK = ((44, 160, 44), (148, 103, 189), (140, 86, 75))


def colour(name: str, i: int) -> tuple[int, int, int]:
    return COLOURS.get(name, FALLBACK[i % len(FALLBACK)])


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def band_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
               title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (640, 420)) -> np.ndarray:
    """{name: (x, mean, min, max)} -> a chart of each mean line over its translucent min-max band."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    xs = [v for s in series.values() for v in s[0]]
    ys = [v for s in series.values() for part in s[1:] for v in part if np.isfinite(v)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y1) * 0.1, 1e-3)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    base = Image.new("RGBA", size, (255, 255, 255, 255))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(base)
    for t in _ticks(y0, y1):
        _, y = px(x0, t)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{t:.5g}", fill=(60, 60, 60), font=font)
    for t in sorted(set(xs)):
        x, _ = px(t, y0)
        draw.text((x - 10, h - bottom + 6), f"{t:g}", fill=(60, 60, 60), font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i, (name, (x, mean, lo, hi)) in enumerate(series.items()):
        rgb = colour(name, i)
        overlay = Image.new("RGBA", size, (0, 0, 0, 0))
        poly = [px(a, b) for a, b in zip(x, hi, strict=True)] + [px(a, b) for a, b in zip(x[::-1], lo[::-1],
                                                                                           strict=True)]
        if len(poly) >= 3:
            ImageDraw.Draw(overlay).polygon(poly, fill=(*rgb, 60))
            base = Image.alpha_composite(base, overlay)
        draw = ImageDraw.Draw(base)
        points = [px(a, b) for a, b in zip(x, mean, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=rgb, width=3)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=rgb)
        draw.text((w - right - 160, top + 8 + 14 * i), f"-- {name}", fill=rgb, font=font)
    draw.text((left, 12), title, fill=(0, 0, 0), font=font)
    draw.text(((w - len(xlabel) * 6) // 2, h - 18), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, 22), ylabel, fill=(0, 0, 0), font=font)
    return np.asarray(base.convert("RGB"))


def labelled_rows(rows: Mapping[str, np.ndarray], label_width: int = 130, scale: int = 2) -> np.ndarray:
    """Rows of (N, H, W, 3) float [0, 1] images, each with its name on the left; enlarged `scale` times."""
    grid = row_grid([np.repeat(np.repeat(r, scale, 1), scale, 2) for r in rows.values()])
    step = grid.shape[0] // len(rows)
    canvas = Image.new("RGB", (grid.shape[1] + label_width, grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(rows):
        draw.text((4, i * step + step // 2 - 6), name, fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(canvas)


def titled_panels(panels: Mapping[str, np.ndarray], gap: int = 12, title_height: int = 18) -> np.ndarray:
    """uint8 images side by side, each under its title."""
    h = max(p.shape[0] for p in panels.values()) + title_height
    w = sum(p.shape[1] for p in panels.values()) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, p in panels.items():
        canvas.paste(Image.fromarray(p), (x, title_height))
        draw.text((x + 2, 3), name, fill=(0, 0, 0), font=ImageFont.load_default())
        x += p.shape[1] + gap
    return np.asarray(canvas)


def stacked(images: Sequence[np.ndarray], gap: int = 12) -> np.ndarray:
    """uint8 images one above the other, left-aligned on white."""
    w = max(p.shape[1] for p in images)
    h = sum(p.shape[0] for p in images) + gap * (len(images) - 1)
    canvas = np.full((h, w, 3), 255, np.uint8)
    y = 0
    for p in images:
        canvas[y:y + p.shape[0], :p.shape[1]] = p
        y += p.shape[0] + gap
    return canvas
