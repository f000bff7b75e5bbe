"""Ahead-of-time TPU compile of every training stage of the replication chain (`configs/replicate.py:tpu`).

    pip install --no-deps --target /opt/libtpu_aot -r requirements-tpu-aot.txt   # libtpu's compiler
    PYTHONPATH=/opt/libtpu_aot:. python -m benchmarks.tpu_aot_replicate [--variant tpu] [--targets v5e-8,v5p-8]

Each stage's job config is derived exactly as the chain derives it (`eqvae_jax.replicate.jobs` / `vq_jobs`;
the fine-tunes' pretrained weights replaced by random init of the same architecture, nothing is read or
materialised) and its real jitted steps are compiled by libtpu for each slice with the existing tools: the
autoencoder stages' generator step (plain and the largest EQ scale) and discriminator step through
`tpu_aot.AbstractJob`, the SiT step through `tpu_aot_dit.compile_step`, the MaskGIT step through
`tpu_aot_maskgit.compile_step`. Per program: XLA's per-chip memory against HBM, whether it fits, and the step
time the FLOPs imply at 40% MFU. The stage estimate is that time x the stage's updates: a lower bound, as
models this small reach far less than 40% MFU (the autoencoder FLOPs are XLA's count, the transformers' the
model count). The classifier and the inference stages (eval, caches, sampling) are not compiled.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend stays CPU; TPUs are compile-only topologies
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from benchmarks import tpu_aot, tpu_aot_dit, tpu_aot_maskgit  # noqa: E402
from benchmarks.tpu_aot_common import GIB, V5E_8, V5P_8, V6E_8, Target, step_seconds  # noqa: E402
from configs import replicate as replicate_config  # noqa: E402
from eqvae_jax.replicate import jobs, vq_jobs  # noqa: E402
from eqvae_jax.replicate.config import ReplicateConfig, parse_config  # noqa: E402

TARGETS = (V5E_8, V5P_8, V6E_8)
MFU = 0.4


def random_init(fine_tune: ConfigDict, pretrain: ConfigDict) -> ConfigDict:
    """The fine-tune's job config with the pretrained weights replaced by the pretraining's random init (same
    architecture, so the same program)."""
    fine_tune.model = pretrain.model
    return fine_tune


def autoencoder_rows(name: str, config: ConfigDict, numerators: tuple[int, ...], den: int,
                     target: Target) -> list[dict[str, Any]]:
    """G plain, G at the largest EQ scale and D plain of an autoencoder fine-tune (the EQ arm's config)."""
    job = tpu_aot.AbstractJob(config, target)
    size, batch = job.config.data.image_size, job.config.global_batch_size
    rows = []
    for kind, plan_name in (("g", "plain"), ("g", f"eq{max(numerators)}"), ("d", "plain")):
        r = job.compile(kind, tpu_aot.parse_plan(plan_name, size, den), batch)
        rows.append({"stage": name, "program": f"{kind}:{plan_name}", "batch": batch, **r,
                     "step_s": step_seconds(r["flops"], target, MFU) if r.get("fits") else math.nan})
    return rows


def stage_rows(c: ReplicateConfig, root: str, target: Target) -> list[tuple[list[dict[str, Any]], int, int]]:
    """(compiled programs, updates of the first program, updates of the last) for every training stage of both
    families: an autoencoder's G runs in pretraining and both fine-tunes, its D (the last row) only in the
    fine-tunes (pretraining has no GAN); a transformer's one program counts once."""
    out = []
    if c.kl:
        a = c.autoencoder
        eq = random_init(jobs.autoencoder(c, root, "eq"), jobs.autoencoder(c, root, "pretrain"))
        rows = autoencoder_rows("KL autoencoder", eq, a.scale_numerators, a.scale_denominator, target)
        out.append((rows, a.pretrain_updates + 2 * a.finetune_updates, 2 * a.finetune_updates))
        f = 2 ** (len(a.channel_mult) - 1)
        shape = (c.image_size // f, c.image_size // f, a.latent_channels)
        r = tpu_aot_dit.compile_step(target, jobs.dit(c, root, "eq", 0, 1.0), shape)
        out.append(([{"stage": "SiT", "program": "train", "batch": c.dit.batch_size, **r}],
                    2 * len(c.dit.seeds) * c.dit.updates, 0))
    if c.vq:
        v, cache = c.vq_autoencoder, jobs.paths(root)["cache"]
        eq = random_init(vq_jobs.autoencoder(c, root, "eq", cache), vq_jobs.autoencoder(c, root, "pretrain", cache))
        rows = autoencoder_rows("VQ autoencoder", eq, v.scale_numerators, v.scale_denominator, target)
        out.append((rows, v.pretrain_updates + 2 * v.finetune_updates, 2 * v.finetune_updates))
        grid = c.image_size // 2 ** (len(v.channel_mult) - 1)
        r = tpu_aot_maskgit.compile_step(target, vq_jobs.maskgit(c, root, "eq", 0, cache), v.n_embed, grid)
        out.append(([{"stage": "MaskGIT", "program": "train", "batch": c.maskgit.batch_size, **r}],
                    2 * len(c.maskgit.seeds) * c.maskgit.updates, 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tpu", help="configs/replicate.py variant, e.g. 'tpu' or 'tpu,vq'")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS[:2]))
    args = parser.parse_args()
    c = parse_config(replicate_config.get_config(args.variant))
    print(f"configs/replicate.py:{args.variant}, {c.image_size} px; jax {jax.__version__}; step time at "
          f"{MFU:.0%} MFU of the bf16 peak (a lower bound for models this small)")
    header = (f"{'slice':<8}{'stage':<16}{'program':<10}{'batch':>6}{'HBM/chip':>10}{'used':>8}{'fits':>6}"
              f"{'TFLOP':>9}{'step ms':>9}{'compile':>9}")
    for target in TARGETS:
        if target.name not in args.targets.split(","):
            continue
        print(header)
        total = 0.0
        with tempfile.TemporaryDirectory(prefix="replicate_aot_") as root:  # paths only: nothing is written there
            stages = stage_rows(c, root, target)
        for rows, updates, last_updates in stages:
            for r in rows:
                tflop = r["flops"] / 1e12 if "flops" in r else r["model_tflop"]
                print(f"{target.name:<8}{r['stage']:<16}{r['program']:<10}{r['batch']:>6}"
                      f"{target.hbm_bytes / GIB:>9.1f}G{r.get('per_chip_gib', math.nan):>7.2f}G"
                      f"{'yes' if r['fits'] else 'NO':>6}{tflop:>9.3f}{r['step_s'] * 1e3:>9.2f}"
                      f"{r['compile_s']:>8.0f}s", flush=True)
            seconds = rows[0]["step_s"] * updates + rows[-1]["step_s"] * last_updates  # G plain, D
            total += seconds
            print(f"{target.name:<8}{rows[0]['stage']:<16}{updates} updates in all: >= {seconds / 60:.1f} min")
        print(f"{target.name:<8}training stages at {MFU:.0%} MFU: >= {total / 60:.1f} min\n")


if __name__ == "__main__":
    main()
