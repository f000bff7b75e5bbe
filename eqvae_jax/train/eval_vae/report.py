"""Outputs of the reconstruction evaluation (job.py): JSON, TensorBoard, a comparison PNG, a console table.

    WORKDIR/results.json              {model: {metric: value}} (null where undefined)
    WORKDIR/results/<model>.json      one model: its spec, metrics and `fid_preprocess` (the Inception input
                                      preprocessing its rFID used: 'adm' or 'pytorch_fid')
    WORKDIR/tensorboard/<model>/      scalars `eval_vae/<metric>` at step 0 (TensorBoard overlays the models as
                                      runs) and images: reconstructions, latent PCA
    WORKDIR/comparison.png            equivariance error per transform as grouped bars (one colour per model),
                                      then the same images: input, and per model its reconstruction and the
                                      PCA-to-RGB picture of its latents (the paper's picture of latent smoothness)

Metric keys: rfid, psnr, ssim, lpips (when an LPIPS is configured), equivariance/<transform> (rot90, ...,
scale0.75), equivariance/rotation and /scale (family means), equivariance/codes/<rotation> and
/codes/rotation (VQ: fraction of codes that commute with the rotation), intrinsic_dimension, id_images, images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping

import numpy as np
from etils import epath

from eqvae_jax import storage
from eqvae_jax.images import row_grid
from eqvae_jax.train.console import number, table
from eqvae_jax.train.eval_vae.config import EvalVAEConfig
from eqvae_jax.train.eval_vae.shards import ORIGINALS
from eqvae_jax.train.event_file import EventFileWriter

log = logging.getLogger(__name__)
EQ = "equivariance/"
HEADLINE = (("rFID", "rfid"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"),
            ("equivariance: rotation", EQ + "rotation"), ("equivariance: scale", EQ + "scale"))
TAIL = (("intrinsic dimension (TwoNN)", "intrinsic_dimension"), ("latents for TwoNN", "id_images"),
        ("images", "images"))


def _json_value(v: float) -> float | None:
    return v if math.isfinite(v) else None


def metric_rows(results: Mapping[str, Mapping[str, float]], config: EvalVAEConfig) -> list[tuple[str, str]]:
    """(label, key) rows of the console table, in reading order, for the keys some model has."""
    transforms = list(config.equivariance.transforms())
    rows = [*HEADLINE, *((f"  {t}", EQ + t) for t in transforms),
            ("codes kept: rotation", EQ + "codes/rotation"),
            *((f"  codes kept: {t}", EQ + "codes/" + t) for t in transforms), *TAIL]
    rows = [(f"rFID ({config.fid_preprocess})" if key == "rfid" else label, key) for label, key in rows]
    return [(label, key) for label, key in rows if any(key in r for r in results.values())]


def format_table(results: Mapping[str, Mapping[str, float]], config: EvalVAEConfig) -> str:
    """Metrics (rows) x models (columns)."""
    names = list(results)
    rows = [(label, *(number(results[n][key]) if key in results[n] else "" for n in names))
            for label, key in metric_rows(results, config)]
    return table(rows, ("", *names))


def comparison_image(results: Mapping[str, Mapping[str, float]], previews: Mapping[str, Mapping[str, np.ndarray]],
                     config: EvalVAEConfig) -> np.ndarray | None:
    """The comparison plot as a uint8 HWC array (module docstring); None without matplotlib."""
    try:
        import matplotlib.pyplot as plt  # plots only: not needed to compute the metrics

        from eqvae_jax import viz
    except ImportError as e:
        log.warning("eval_vae: no comparison plot (%s); pip install matplotlib", e)
        return None
    parts = []
    names = [*config.equivariance.transforms(), "rotation", "scale"]
    bars = {m: {n: r[EQ + n] for n in names if EQ + n in r} for m, r in results.items()}
    if any(bars.values()):
        parts.append(viz.equivariance_bars(bars, [n for n in names if any(n in b for b in bars.values())]))
    originals = previews.get(ORIGINALS, {}).get("images")
    if originals is not None and len(originals):
        rows = {"input": list(originals)}
        for m in results:
            if m in previews:
                rows[f"{m}: reconstruction"] = list(previews[m]["recon"])
                rows[f"{m}: latent PCA"] = list(previews[m]["pca"])
        parts.append(viz.image_rows(rows, cell_inches=1.4))
    if not parts:
        return None
    images = []
    for fig in parts:
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        plt.close(fig)
    width = max(i.shape[1] for i in images)
    padded = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    return np.concatenate(padded, axis=0)


def _tensorboard(workdir: str, results: Mapping[str, Mapping[str, float]],
                 previews: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """WORKDIR/tensorboard/<model>: scalars and the preview grid (for gs://, written locally and copied up)."""
    staged = storage.StagedDir(f"{workdir}/tensorboard") if storage.is_url(workdir) else None
    root = staged.local if staged else f"{workdir}/tensorboard"  # event files are written locally
    try:
        _write_events(root, results, previews)
    finally:
        if staged:
            staged.close()


def _write_events(root: str, results: Mapping[str, Mapping[str, float]],
                  previews: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    originals = previews.get(ORIGINALS, {}).get("images")
    for name, scalars in results.items():
        writer = EventFileWriter(f"{root}/{name}")
        writer.write_scalars(0, {f"eval_vae/{k}": v for k, v in scalars.items() if math.isfinite(v)})
        if name in previews and originals is not None:
            to01 = lambda a: np.asarray(a, np.float32) / 255.0
            grid = row_grid([to01(originals), to01(previews[name]["recon"]), to01(previews[name]["pca"])])
            writer.write_images(0, {"input_reconstruction_latent_pca": grid[None]})
        writer.flush()
        writer.close()


def write_all(workdir: str, config: EvalVAEConfig, results: Mapping[str, Mapping[str, float]],
              previews: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, str]:
    """Write every output (module docstring) and log the table; returns {output: path}."""
    root = epath.Path(workdir)
    (root / "results").mkdir(parents=True, exist_ok=True)
    specs = config.specs()
    for name, scalars in results.items():
        payload = {"model": name, "spec": dataclasses.asdict(specs[name]), "fid_preprocess": config.fid_preprocess,
                   "metrics": {k: _json_value(v) for k, v in scalars.items()}}
        storage.write_atomic(root / "results" / f"{name}.json", json.dumps(payload, indent=2).encode())
    combined = {name: {k: _json_value(v) for k, v in s.items()} for name, s in results.items()}
    storage.write_atomic(root / "results.json", json.dumps(combined, indent=2).encode())
    outputs = {"results": str(root / "results.json"), "TensorBoard": str(root / "tensorboard")}
    _tensorboard(str(root), results, previews)
    image = comparison_image(results, previews, config)
    if image is not None:
        from PIL import Image

        with storage.atomic_file(str(root / "comparison.png"), suffix=".png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        outputs["comparison plot"] = str(root / "comparison.png")
    log.info("eval_vae results\n%s\n\n%s", format_table(results, config),
             table(list(outputs.items())))
    return outputs
