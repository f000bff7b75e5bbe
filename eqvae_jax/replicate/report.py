"""The chain's report in its root directory: report.md (tables), metrics.json (every number), curves.png
(sample-FID vs updates, mean line and min-max band over seeds per arm), samples.png (class-conditional samples of
both arms at the same update), latents.png (latent PCA pictures and decoded rotated / scaled latents).

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
from eqvae_jax.replicate.runner import read_marker, read_record

FILES = ("report.md", "metrics.json", "curves.png", "samples.png", "latents.png")
SAMPLE_KEYS = ("fid", "precision", "recall", "class_accuracy", "inception_score")
AE_ROWS = (("equivariance error, rotation (mean of 90/180/270)", "equivariance/rotation"),
           ("equivariance error, scale (mean of 0.25/0.5/0.75)", "equivariance/scale"),
           ("TwoNN intrinsic dimension", "intrinsic_dimension"), ("high-frequency energy", "hf_energy"),
           ("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("shapes-rFID", "rfid"))


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "seeds": len(values)}


def collect(c: ReplicateConfig, root: str) -> dict[str, Any]:
    """Every number of the chain from the stage markers (metrics.json)."""
    ev = read_marker(root, "eval")["results"]
    autoencoder = {arm: {**ev["eval_vae"][arm], **ev["latents"][arm]} for arm in ARMS}
    runs = {arm: {str(s): read_marker(root, f"dit_{arm}_seed{s}")["results"]["curve"] for s in c.dit.seeds}
            for arm in ARMS}
    updates = sorted({int(u) for arm in ARMS for curve in runs[arm].values() for u in curve})
    summary: dict[str, Any] = {}
    for u in updates:
        row = {arm: {k: spread([runs[arm][str(s)][str(u)][k] for s in c.dit.seeds]) for k in SAMPLE_KEYS}
               for arm in ARMS}
        eq, ctl = row["eq"]["fid"], row["control"]["fid"]
        row["fid_difference_control_minus_eq"] = ctl["mean"] - eq["mean"]
        row["fid_difference_exceeds_spread"] = bool(eq["max"] < ctl["min"] or ctl["max"] < eq["min"])
        summary[str(u)] = row
    record = read_record(root)
    return {"classifier": read_marker(root, "classifier")["results"], "autoencoder": autoencoder,
            "dit_runs": runs, "dit_summary": summary,
            "stage_seconds": {k: v["seconds"] for k, v in record.items()},
            "total_seconds": float(sum(v["seconds"] for v in record.values()))}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(c: ReplicateConfig, m: dict[str, Any]) -> str:
    lines = ["# EQ-VAE replication on `shapes`", "",
             f"Image size {c.image_size}, seeds {list(c.dit.seeds)} for the DiT stage, EQ branch probability "
             f"{c.autoencoder.p_equivariance} (control 0). Numbers compare runs within the shapes domain only.", "",
             f"Shapes classifier held-out accuracy: {m['classifier']['held_out_accuracy']:.4f}", "",
             "## Autoencoders (held-out shapes)", "", "| metric | EQ | control |", "|---|---|---|"]
    ae = m["autoencoder"]
    for label, key in AE_ROWS:
        lines.append(f"| {label} | {_fmt(ae['eq'].get(key))} | {_fmt(ae['control'].get(key))} |")
    transforms = sorted(k for k in ae["eq"] if k.startswith("equivariance/") and k.split("/")[1][:3] in ("rot", "sca")
                        and k.split("/")[1] not in ("rotation", "scale"))
    for key in transforms:
        lines.append(f"| equivariance error {key.split('/')[1]} | {_fmt(ae['eq'][key])} | "
                     f"{_fmt(ae['control'][key])} |")
    lines += ["", "## Class-conditional DiT: sample metrics (mean [min, max] over seeds)", "",
              "| update | shapes-FID EQ | shapes-FID control | control - EQ | exceeds spread | precision EQ / control "
              "| recall EQ / control | class accuracy EQ / control |", "|---|---|---|---|---|---|---|---|"]
    def cell(row: dict[str, Any], arm: str, key: str) -> str:
        s = row[arm][key]
        return f"{s['mean']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"

    for u, row in m["dit_summary"].items():

        pair = {k: f"{row['eq'][k]['mean']:.3f} / {row['control'][k]['mean']:.3f}"
                for k in ("precision", "recall", "class_accuracy")}
        lines.append(f"| {u} | {cell(row, 'eq', 'fid')} | {cell(row, 'control', 'fid')} | "
                     f"{row['fid_difference_control_minus_eq']:.4g} | "
                     f"{'yes' if row['fid_difference_exceeds_spread'] else 'no'} | {pair['precision']} | "
                     f"{pair['recall']} | {pair['class_accuracy']} |")
    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m["stage_seconds"].items()]
    lines += [f"| total (before the report) | {m['total_seconds']:.1f} |", "",
              "![sample-FID vs updates](curves.png)", "", "![samples](samples.png)", "", "![latents](latents.png)", ""]
    return "\n".join(lines)


def curves(c: ReplicateConfig, m: dict[str, Any]) -> np.ndarray:
    updates = [int(u) for u in m["dit_summary"]]
    series = {}
    for arm in ARMS:
        s = [m["dit_summary"][str(u)][arm]["fid"] for u in updates]
        series[arm] = (updates, [x["mean"] for x in s], [x["min"] for x in s], [x["max"] for x in s])
    return figures.band_chart(series, f"shapes sample-FID (mean, min-max over {len(c.dit.seeds)} seeds)",
                              "DiT updates", "shapes-FID")


def samples(c: ReplicateConfig, root: str) -> np.ndarray:
    """Both arms' kept samples of the first seed at the last update (one column per class)."""
    u, seed = c.dit.updates, c.dit.seeds[0]
    panels = {}
    for arm in ARMS:
        with np.load(os.path.join(root, f"dit_{arm}_seed{seed}", "sample_metrics", f"{u}.npz")) as z:
            grid = class_grid(z["images"], z["labels"])
        panels[f"{arm}, update {u}, seed {seed}"] = np.asarray(
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST))
    return figures.titled_panels(panels)


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


def write(c: ReplicateConfig, root: str) -> dict[str, Any]:
    """Write every report file; returns their paths."""
    m = collect(c, root)
    with open(os.path.join(root, "metrics.json"), "w") as f:
        json.dump(m, f, indent=2)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(markdown(c, m))
    Image.fromarray(curves(c, m)).save(os.path.join(root, "curves.png"))
    Image.fromarray(samples(c, root)).save(os.path.join(root, "samples.png"))
    Image.fromarray(latents_picture(root)).save(os.path.join(root, "latents.png"))
    return {name: os.path.join(root, name) for name in FILES}
