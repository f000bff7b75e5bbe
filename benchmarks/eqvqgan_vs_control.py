"""EQ-VQGAN against a control run without the equivariance branch: the VQ equivariance error over fine-tuning.

    python -m benchmarks.eqvqgan_vs_control [--variant demo|tiny] [--pretrain N] [--updates N] [--disc-start N]
        [--eval-batches N] [--workdir /tmp/eqvqgan_vs_control]

Both runs go through the production job (`train.eqvae.job.run`, what `python -m eqvae_jax.main
--config=configs/vqgan_ft.py:demo` runs) on the demo photos, with the same seed, data order and number of
updates: `--pretrain` updates of plain reconstruction (identical in both runs: the transform sampler is not drawn
before fine-tuning starts; the GAN is on from `--disc-start` in both), then fine-tuning to `--updates` with the
EQ branch drawn half the time (transform.p_equivariance=0.5) or never (the control, p_equivariance=0). The
low-res branch is off in both, so that the only difference is the equivariance objective. Monitoring runs at
the start of fine-tuning and at the end on the same held-out images: the latent equivariance error on the
pre-quantization features (rotations, scales), the fraction of code indices that commute with rotations, PSNR and
the codebook usage; the table also gives the last logged reconstruction L1 and the fraction of generator steps
that drew the EQ branch.

`--variant demo` (default, ~10 min per run on 2 cores): the `:demo` model (f4, 32/64/64 channels, attention at the
16 px latent, 128 codes of 16 channels) from random init at 64 px, 150 plain updates, then fine-tuning to 300,
GAN from 150, 4 held-out batches. `--variant tiny` (seconds): the `tiny` preset (f2, 16 codes of 4
channels) at 32 px, 30 + 70 updates, GAN from 10, lr 2e-4. Both from random init, so the numbers show the
direction of the effect, not the paper's f16 VQGAN figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from configs import vqgan_ft  # noqa: E402
from eqvae_jax.train.eqvae import job as eqvae_job  # noqa: E402
from eqvae_jax.train.metrics_file import read_metrics  # noqa: E402

COLUMNS = (("rot err", "eval/equivariance/rotation"), ("scale err", "eval/equivariance/scale"),
           ("codes commute", "eval/equivariance/codes/rotation"), ("psnr", "eval/psnr"),
           ("usage", "eval/codebook_usage"))


# variant -> (pretrain, updates, disc_start, eval batches) defaults
VARIANTS = {"demo": (150, 300, 150, 4), "tiny": (30, 100, 10, 1)}


def experiment_config(variant: str, p_equivariance: float, pretrain: int, updates: int, workdir: str,
                      eval_batches: int, disc_start: int):
    c = vqgan_ft.get_config(variant)
    c.transform.p_equivariance = p_equivariance
    c.transform.p_lowres = 0.0
    c.optim.scale_lr, c.optim.base_lr = False, 2e-4  # from random init (the demo variant's rate)
    c.optim.accumulate = 1
    c.pretrain_updates = pretrain
    c.loss.disc_start = disc_start
    c.total_updates = updates
    c.log.every_updates = 5
    c.eval.every_updates = 10 * updates  # at 0, at the end of pre-training and at the end
    c.eval.batches, c.eval.images = eval_batches, 0
    c.checkpoint.every_updates = 10 * updates
    c.export_taming = False
    c.compilation_cache_dir = os.path.join(workdir, "jax_cache")  # the control reuses the plain programs
    c.data.data_dir = os.path.join(workdir, "tfds")
    return c


def run_one(name: str, p_equivariance: float, args) -> dict:
    workdir = os.path.join(args.workdir, name)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    summary = eqvae_job.run(experiment_config(args.variant, p_equivariance, args.pretrain, args.updates,
                                              args.workdir, args.eval_batches, args.disc_start), workdir)
    rows = [r for r in read_metrics(workdir) if "g/rec_l1" in r]
    tuned = [r for r in rows if r["update"] > args.pretrain]
    return {"evals": summary["evals"], "rec_l1": rows[-1]["g/rec_l1"],
            "eq_fraction": sum(r["branch_g/equivariance"] for r in tuned) / max(1, len(tuned)),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="demo", help="configs/vqgan_ft.py variant")
    parser.add_argument("--pretrain", type=int, help="plain-reconstruction updates before fine-tuning")
    parser.add_argument("--updates", type=int, help="total updates (pre-training included)")
    parser.add_argument("--eval-batches", type=int, help="held-out evaluation batches")
    parser.add_argument("--disc-start", type=int, help="GAN start update")
    parser.add_argument("--workdir", default="/tmp/eqvqgan_vs_control")
    args = parser.parse_args()
    for name, default in zip(("pretrain", "updates", "disc_start", "eval_batches"), VARIANTS[args.variant],
                             strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    flags.FLAGS.mark_as_parsed()
    results = {"EQ-VQGAN": run_one("eq", 0.5, args), "control": run_one("control", 0.0, args)}
    print(f"\nconfigs/vqgan_ft.py:{args.variant} on the demo photos, seed 23: {args.pretrain} plain updates, then "
          f"{args.updates - args.pretrain} fine-tuning updates; errors on held-out images "
          f"(load average {os.getloadavg()[0]:.1f})")
    head = f"{'run':<10}{'update':>7}" + "".join(f"{c:>15}" for c, _ in COLUMNS)
    print(head + f"{'rec L1 (last)':>15}{'EQ draws':>10}{'wall s':>8}")
    for name, r in results.items():
        for update in (args.pretrain, args.updates):
            e = r["evals"][update]
            line = f"{name:<10}{update:>7}" + "".join(f"{e[k]:>15.4f}" for _, k in COLUMNS)
            if update == args.updates:
                line += f"{r['rec_l1']:>15.4f}{r['eq_fraction']:>10.2f}{r['seconds']:>8.0f}"
            print(line)
    eq, ctrl = (results[n]["evals"][args.updates] for n in ("EQ-VQGAN", "control"))
    for label, key in COLUMNS[:3]:
        print(f"{label} at the end, EQ-VQGAN / control: {eq[key]:.4f} / {ctrl[key]:.4f} "
              f"({(eq[key] / ctrl[key] - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
