"""Entry point of every job: python -m eqvae_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v].

The config's `trainer` field picks the job. Multi-host runs (TPU pods) call `jax.distributed.initialize()`
first; everything else (mesh, data sharding, checkpoints) follows from the config.
"""

from __future__ import annotations

import importlib

from absl import app, flags
from ml_collections import config_flags

from eqvae_jax.parallel import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Job config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports of this run.")
flags.DEFINE_bool("distributed", None, "Force (--distributed) or prevent (--nodistributed) "
                  "jax.distributed.initialize(); default: when JAX detects a multi-process TPU/Slurm/MPI job.")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {
    "eqvae": "eqvae_jax.train.eqvae_trainer",
    "extract_latents": "eqvae_jax.train.latent_extraction",
    "dit": "eqvae_jax.train.dit_trainer",
}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if "trainer" not in config or config.trainer not in TRAINERS:
        raise app.UsageError(f"config.trainer must be one of {sorted(TRAINERS)}, got {config.get('trainer')!r}")
    distributed.maybe_initialize(FLAGS.distributed)
    trainer = importlib.import_module(TRAINERS[config.trainer])
    trainer.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
