"""report.md: the chain's tables from metrics.json's numbers (report.collect), one section per family it ran."""

from __future__ import annotations

from typing import Any

from eqvae_jax.replicate.config import ReplicateConfig

AE_ROWS = (("equivariance error, rotation (mean of 90/180/270)", "equivariance/rotation"),
           ("equivariance error, scale (mean of 0.25/0.5/0.75)", "equivariance/scale"),
           ("TwoNN intrinsic dimension", "intrinsic_dimension"), ("high-frequency energy", "hf_energy"),
           ("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("shapes-rFID", "rfid"))
VQ_ROWS = (("equivariance error, rotation (mean of 90/180/270; pre-quantization features)", "equivariance/rotation"),
           ("equivariance error, scale (mean of 0.25/0.5/0.75; pre-quantization features)", "equivariance/scale"),
           ("codes kept under rotation (mean of 90/180/270)", "equivariance/codes/rotation"),
           ("TwoNN intrinsic dimension (pre-quantization features)", "intrinsic_dimension"),
           ("high-frequency energy (pre-quantization features)", "hf_energy"),
           ("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("shapes-rFID", "rfid"),
           ("codebook usage (held-out images)", "codebook_usage"),
           ("codebook perplexity (held-out images)", "codebook_perplexity"))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def autoencoder_table(ae: dict[str, dict[str, Any]], rows: tuple[tuple[str, str], ...]) -> list[str]:
    """EQ vs control rows of `rows`, then the equivariance error per transform."""
    lines = ["| metric | EQ | control |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {_fmt(ae['eq'].get(key))} | {_fmt(ae['control'].get(key))} |")
    transforms = sorted(k for k in ae["eq"] if k.startswith("equivariance/") and k.split("/")[1][:3] in ("rot", "sca")
                        and k.split("/")[1] not in ("rotation", "scale"))
    for key in transforms:
        lines.append(f"| equivariance error {key.split('/')[1]} | {_fmt(ae['eq'][key])} | "
                     f"{_fmt(ae['control'][key])} |")
    return lines


def sample_table(summary: dict[str, Any]) -> list[str]:
    """Per checkpoint: shapes-FID mean [min, max] over seeds per arm, the difference, whether it exceeds the
    spread, and the means of precision, recall and class accuracy."""
    lines = ["| update | shapes-FID EQ | shapes-FID control | control - EQ | exceeds spread | precision EQ / control "
             "| recall EQ / control | class accuracy EQ / control |", "|---|---|---|---|---|---|---|---|"]

    def cell(row: dict[str, Any], arm: str, key: str) -> str:
        s = row[arm][key]
        return f"{s['mean']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"

    for u, row in summary.items():
        pair = {k: f"{row['eq'][k]['mean']:.3f} / {row['control'][k]['mean']:.3f}"
                for k in ("precision", "recall", "class_accuracy")}
        lines.append(f"| {u} | {cell(row, 'eq', 'fid')} | {cell(row, 'control', 'fid')} | "
                     f"{row['fid_difference_control_minus_eq']:.4g} | "
                     f"{'yes' if row['fid_difference_exceeds_spread'] else 'no'} | {pair['precision']} | "
                     f"{pair['recall']} | {pair['class_accuracy']} |")
    return lines


def markdown(c: ReplicateConfig, m: dict[str, Any]) -> str:
    lines = ["# EQ-VAE replication on `shapes`", "",
             f"Image size {c.image_size}; families: {', '.join(m['families'])}. Numbers compare runs within the "
             "shapes domain only.", "",
             f"Shapes classifier held-out accuracy: {m['classifier']['held_out_accuracy']:.4f}", ""]
    if c.kl:
        lines += [f"KL family: EQ branch probability {c.autoencoder.p_equivariance} (control 0), DiT seeds "
                  f"{list(c.dit.seeds)}.", "", "## Autoencoders (held-out shapes)", ""]
        lines += autoencoder_table(m["autoencoder"], AE_ROWS)
        lines += ["", "## Class-conditional DiT: sample metrics (mean [min, max] over seeds)", ""]
        lines += sample_table(m["dit_summary"])
        lines.append("")
    if c.vq:
        lines += [f"VQ family: EQ branch probability {c.vq_autoencoder.p_equivariance} (control 0), MaskGIT seeds "
                  f"{list(c.maskgit.seeds)}.", "", "## VQ autoencoders (held-out shapes)", ""]
        lines += autoencoder_table(m["vq_autoencoder"], VQ_ROWS)
        lines += ["", "## Class-conditional MaskGIT: sample metrics (mean [min, max] over seeds)", ""]
        lines += sample_table(m["maskgit_summary"])
        lines.append("")
    lines += ["## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m["stage_seconds"].items()]
    lines += [f"| total (before the report) | {m['total_seconds']:.1f} |", "",
              "![sample-FID vs updates](curves.png)", "", "![samples](samples.png)", ""]
    if c.kl:
        lines += ["![latents](latents.png)", ""]
    return "\n".join(lines)
