"""matplotlib figures for the notebooks: image rows, equivariance bars, training curves, live updates.

The notebooks and the reconstruction evaluation's comparison PNG (`train.eval_vae.report`, imported lazily)
use this module (matplotlib is preinstalled on Colab and pinned in requirements-dev.txt; the training and
conversion paths never need it). Ground floor: it imports nothing of the package, so any layer may use it.
Every function returns a `Figure` and leaves displaying to the caller (a notebook shows a returned figure;
`LiveDisplay` redraws one in place while a job runs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

# Training curves of the EQ-VAE job: (panel title, metrics.jsonl keys drawn in it).
EQVAE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reconstruction L1 (train)", ("g/rec_l1",)),
    ("discriminator loss (train)", ("d/disc_loss",)),
    ("latent equivariance error (eval)", ("eval/equivariance/rotation", "eval/equivariance/scale")),
)


def to_display(image: np.ndarray) -> np.ndarray:
    """An HWC image for imshow: uint8 as is, floats in [-1, 1] mapped to [0, 1]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip((image.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def image_rows(rows: Mapping[str, Sequence[np.ndarray]], column_titles: Sequence[str] = (),
               cell_inches: float = 1.8) -> Figure:
    """One row of images per entry ({row label: images}); images may differ in size (each fills its cell)."""
    if not rows:
        raise ValueError("image_rows needs at least one row of images.")
    n_cols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(cell_inches * n_cols, cell_inches * len(rows)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(to_display(images[c]))
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label)
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c])
    fig.tight_layout()
    return fig


def equivariance_bars(table: Mapping[str, Mapping[str, float]], transforms: Sequence[str] = ()) -> Figure:
    """Grouped bars: the latent equivariance error per transform (x) for each model (colour), lower is better.

    `table` is `eval.compare.equivariance_table`'s {model: {transform: error}}; `transforms` picks and orders
    the columns (default: every key of the first model in its order)."""
    if not table:
        raise ValueError("equivariance_bars needs at least one model.")
    names = list(transforms) or list(next(iter(table.values())))
    models = list(table)
    width = 0.8 / len(models)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 3.5))
    for i, model in enumerate(models):
        values = [table[model].get(n, np.nan) for n in names]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
    ax.set_xticks(x, names)
    ax.set_ylabel("||tau(E(x)) - E(tau(x))||² / ||E(tau(x))||²")
    ax.set_title("latent equivariance error (lower is better)")
    ax.legend()
    fig.tight_layout()
    return fig


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(updates, values) of one metric from metrics.jsonl rows, skipping rows without it or with a non-number."""
    points = [(r["update"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    if not points:
        return np.zeros(0), np.zeros(0)
    updates, values = zip(*points, strict=True)
    return np.asarray(updates, np.float64), np.asarray(values, np.float64)


def training_curves(rows: Sequence[Mapping[str, Any]],
                    panels: Sequence[tuple[str, Sequence[str]]] = EQVAE_PANELS) -> Figure:
    """One panel per (title, metric keys) with each key's curve over updates (from WORKDIR/metrics.jsonl)."""
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3.0), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            updates, values = series(rows, key)
            if len(updates):
                ax.plot(updates, values, marker="o" if len(updates) < 30 else None, label=key.rsplit("/", 1)[-1])
        ax.set_title(title)
        ax.set_xlabel("update")
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


class LiveDisplay:
    """A figure and a text block shown once in a notebook and then replaced in place on every `show`."""

    def __init__(self) -> None:
        self._figure = None
        self._text = None

    def show(self, fig: Figure, text: str = "") -> None:
        from IPython.display import display  # notebooks only

        if self._figure is None:
            self._figure = display(fig, display_id=True)
            self._text = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self._figure.update(fig)
            self._text.update({"text/plain": text}, raw=True)
        plt.close(fig)
