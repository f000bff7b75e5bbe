"""The chain's report in its root directory: report.md (tables), metrics.json (every number), curves.png
(sample-FID vs updates, mean line and min-max band over seeds per arm: a DiT panel and a MaskGIT panel),
samples.png (class-conditional samples of both arms at the same update, DiT and MaskGIT), latents.png (KL latent
PCA pictures and decoded rotated / scaled latents). A family the config leaves out has no section or panel.

"exceeds the spread" at a checkpoint means the arms' min-max ranges over seeds do not overlap.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from eqvae_jax.replicate import figures
from eqvae_jax.replicate.config import ARMS, ReplicateConfig
from eqvae_jax.replicate.jobs import NUM_CLASSES
from eqvae_jax.replicate.report_md import markdown
from eqvae_jax.replicate.runner import read_marker, read_record

FILES = ("report.md", "metrics.json", "curves.png", "samples.png", "latents.png")
SAMPLE_KEYS = ("fid", "precision", "recall", "class_accuracy", "inception_score")


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "seeds": len(values)}


def summarise(runs: dict[str, dict[str, dict[str, Any]]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """{update: {arm: {metric: spread over seeds}, FID difference, whether it exceeds the spread}} of the curves
    {arm: {seed: {update: metrics}}}."""
    updates = sorted({int(u) for arm in ARMS for curve in runs[arm].values() for u in curve})
    summary: dict[str, Any] = {}
    for u in updates:
        row = {arm: {k: spread([runs[arm][str(s)][str(u)][k] for s in seeds]) for k in SAMPLE_KEYS}
               for arm in ARMS}
        eq, ctl = row["eq"]["fid"], row["control"]["fid"]
        row["fid_difference_control_minus_eq"] = ctl["mean"] - eq["mean"]
        row["fid_difference_exceeds_spread"] = bool(eq["max"] < ctl["min"] or ctl["max"] < eq["min"])
        summary[str(u)] = row
    return summary


def collect(c: ReplicateConfig, root: str) -> dict[str, Any]:
    """Every number of the chain from the stage markers (metrics.json)."""
    record = read_record(root)
    m: dict[str, Any] = {"classifier": read_marker(root, "classifier")["results"],
                         "families": [f for f, on in (("kl", c.kl), ("vq", c.vq)) if on]}
    if c.kl:
        ev = read_marker(root, "eval")["results"]
        m["autoencoder"] = {arm: {**ev["eval_vae"][arm], **ev["latents"][arm]} for arm in ARMS}
        m["dit_runs"] = {arm: {str(s): read_marker(root, f"dit_{arm}_seed{s}")["results"]["curve"]
                               for s in c.dit.seeds} for arm in ARMS}
        m["dit_summary"] = summarise(m["dit_runs"], c.dit.seeds)
    if c.vq:
        ev = read_marker(root, "vq_eval")["results"]
        m["vq_autoencoder"] = {arm: {**ev["eval_vae"][arm], **ev["codes"][arm]} for arm in ARMS}
        m["maskgit_runs"] = {arm: {str(s): read_marker(root, f"maskgit_{arm}_seed{s}")["results"]["curve"]
                                   for s in c.maskgit.seeds} for arm in ARMS}
        m["maskgit_summary"] = summarise(m["maskgit_runs"], c.maskgit.seeds)
    m["stage_seconds"] = {k: v["seconds"] for k, v in record.items()}
    m["total_seconds"] = float(sum(v["seconds"] for v in record.values()))
    return m


def curve_panel(summary: dict[str, Any], seeds: int, model: str) -> np.ndarray:
    updates = [int(u) for u in summary]
    series = {}
    for arm in ARMS:
        s = [summary[str(u)][arm]["fid"] for u in updates]
        series[arm] = (updates, [x["mean"] for x in s], [x["min"] for x in s], [x["max"] for x in s])
    return figures.band_chart(series, f"{model}: shapes sample-FID (mean, min-max over {seeds} seeds)",
                              f"{model} updates", "shapes-FID")


def curves(c: ReplicateConfig, m: dict[str, Any]) -> np.ndarray:
    """The DiT panel and the MaskGIT panel side by side (one of them when one family ran)."""
    panels = {}
    if c.kl:
        panels["DiT / SiT on the KL latents"] = curve_panel(m["dit_summary"], len(c.dit.seeds), "DiT")
    if c.vq:
        panels["MaskGIT on the VQ tokens"] = curve_panel(m["maskgit_summary"], len(c.maskgit.seeds), "MaskGIT")
    return figures.titled_panels(panels)


def sample_panels(root: str, prefix: str, update: int, seed: int, model: str) -> np.ndarray:
    """Both arms' kept samples of one run's checkpoint side by side (one column per class)."""
    panels = {}
    for arm in ARMS:
        with np.load(os.path.join(root, f"{prefix}_{arm}_seed{seed}", "sample_metrics", f"{update}.npz")) as z:
            grid = class_grid(z["images"], z["labels"])
        panels[f"{model} {arm}, update {update}, seed {seed}"] = np.asarray(
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST))
    return figures.titled_panels(panels)


def samples(c: ReplicateConfig, root: str) -> np.ndarray:
    """Both arms' kept samples of the first seed at the last update: a DiT row and a MaskGIT row."""
    rows = []
    if c.kl:
        rows.append(sample_panels(root, "dit", c.dit.updates, c.dit.seeds[0], "DiT"))
    if c.vq:
        rows.append(sample_panels(root, "maskgit", c.maskgit.updates, c.maskgit.seeds[0], "MaskGIT"))
    return figures.stacked(rows)


def class_grid(images: np.ndarray, labels: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """uint8 samples in columns by class label (as many rows as the rarest class fills)."""
    columns = [images[labels == k] for k in range(classes)]
    rows = min(len(col) for col in columns)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, classes * w, 3), np.uint8)
    for k, col in enumerate(columns):
        for r in range(rows):
            grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = col[r]
    return grid


def latents_picture(root: str) -> np.ndarray:
    with np.load(os.path.join(root, "eval", "latent_pictures.npz")) as z:
        rows = {str(name): z[f"row{i}"] for i, name in enumerate(z["names"])}
    return figures.labelled_rows(rows)


def files(c: ReplicateConfig) -> tuple[str, ...]:
    """The report's files for this config (latents.png shows KL latents: only with the KL family)."""
    return FILES if c.kl else tuple(f for f in FILES if f != "latents.png")


def write(c: ReplicateConfig, root: str) -> dict[str, Any]:
    """Write every report file; returns their paths."""
    m = collect(c, root)
    with open(os.path.join(root, "metrics.json"), "w") as f:
        json.dump(m, f, indent=2)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(markdown(c, m))
    Image.fromarray(curves(c, m)).save(os.path.join(root, "curves.png"))
    Image.fromarray(samples(c, root)).save(os.path.join(root, "samples.png"))
    if c.kl:
        Image.fromarray(latents_picture(root)).save(os.path.join(root, "latents.png"))
    return {name: os.path.join(root, name) for name in files(c)}
