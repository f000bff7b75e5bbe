"""Export an EQ-VAE run's autoencoder on demand, at any checkpoint, as a diffusers directory (+ Flax weights).

    python -m eqvae_jax.export --workdir=WORKDIR [--update=N] [--ema] [--dst=DIR]

Reads WORKDIR/config.json (written by the run), restores the checkpoint (default: the latest) and writes
DIR/diffusers (loads with `diffusers.AutoencoderKL.from_pretrained`) and DIR/flax (default DIR: WORKDIR/export).
The end of a training run does the same automatically.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from etils import epath
from ml_collections import ConfigDict

from eqvae_jax import cli
from eqvae_jax.storage import resolve
from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.console import setup_logging
from eqvae_jax.train.eqvae.config import parse_config
from eqvae_jax.train.eqvae.export import export_autoencoder
from eqvae_jax.train.eqvae.job import build
from eqvae_jax.typed_config import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "The run's workdir.")
    flags.DEFINE_integer("update", None, "Checkpoint (optimizer update) to export (default: the latest).")
    flags.DEFINE_bool("ema", False, "Export the EMA weights (the run must have ema.enabled).")
    flags.DEFINE_string("dst", None, "Output directory (default: WORKDIR/export).")
    flags.mark_flags_as_required(["workdir"])


def export(workdir: str, update: int | None = None, use_ema: bool = False, dst: str | None = None) -> str:
    """Restore `update` (default latest) of the run in `workdir` and export it; returns the diffusers dir."""
    workdir = resolve(workdir)
    config = parse_config(ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text())))
    if use_ema and not config.ema.enabled:
        raise ValueError(f"{workdir} was trained without EMA (ema.enabled=False); drop --ema")
    built = build(config)
    checkpointer = Checkpointer(f"{workdir}/checkpoints")
    try:
        update = checkpointer.latest_step() if update is None else update
        if update is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        state = checkpointer.restore(update, built.state).state
    finally:
        checkpointer.close()
    return export_autoencoder(built.spec.vae_graph, state.ema if use_ema else state.vae, dst or f"{workdir}/export")


def main(argv: list[str]) -> None:
    del argv
    setup_logging("WARNING")  # the export's own result, not Orbax's INFO lines
    try:
        print(export(FLAGS.workdir, FLAGS.update, FLAGS.ema, FLAGS.dst))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
