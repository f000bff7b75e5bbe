"""Export an EQ-VAE run's autoencoder on demand, at any checkpoint, as a diffusers directory (+ Flax weights).

    python -m eqvae_jax.export --workdir=WORKDIR [--step=N] [--ema] [--dst=DIR]

Reads WORKDIR/config.json (written by the run), restores the checkpoint (default: the latest) and writes
DIR/diffusers (loads with `diffusers.AutoencoderKL.from_pretrained`) and DIR/flax (default DIR: WORKDIR/export).
The end of a training run does the same automatically.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from etils import epath
from ml_collections import ConfigDict

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint micro-step to export (default: the latest).")
flags.DEFINE_bool("ema", False, "Export the EMA weights (the run must have ema.enabled).")
flags.DEFINE_string("dst", None, "Output directory (default: WORKDIR/export).")
flags.mark_flags_as_required(["workdir"])


def export(workdir: str, step: int | None = None, use_ema: bool = False, dst: str | None = None) -> str:
    """Restore `step` (default latest) of the run in `workdir` and export it; returns the diffusers dir."""
    from eqvae_jax.train import eqvae_trainer
    from eqvae_jax.train.checkpointing import Checkpointer
    from eqvae_jax.train.run import resolve

    workdir = resolve(workdir)
    config = ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))
    if use_ema and not config.ema.enabled:
        raise ValueError(f"{workdir} was trained without EMA (ema.enabled=False); drop --ema")
    job = eqvae_trainer.build_job(config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    job.state = checkpointer.restore(step, job.state).state
    checkpointer.close()
    return eqvae_trainer.export_diffusers(job, dst or os.path.join(workdir, "export"), use_ema)


def main(argv: list[str]) -> None:
    del argv
    print(export(FLAGS.workdir, FLAGS.step, FLAGS.ema, FLAGS.dst))


if __name__ == "__main__":
    app.run(main)
