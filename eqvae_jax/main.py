"""Entry point of every job: python -m eqvae_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v].

The config's `trainer` field picks the job. Multi-host runs (TPU pods) call `jax.distributed.initialize()`
first; everything else (mesh, data sharding, checkpoints) follows from the config.
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Job config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports of this run.")
flags.DEFINE_bool("distributed", None,
                  "Call jax.distributed.initialize() (default: auto-detect a multi-host TPU/Slurm/MPI setup).")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {
    "eqvae": "eqvae_jax.train.eqvae_trainer",
    "extract_latents": "eqvae_jax.train.latent_extraction",
    "dit": "eqvae_jax.train.dit_trainer",
}


def multi_host_environment() -> bool:
    """True on a multi-worker TPU slice/pod (GKE sets TPU_WORKER_HOSTNAMES) or a multi-task Slurm/MPI launch.

    On plain Cloud TPU VMs the worker list may only be in the metadata server: pass --distributed there.
    """
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        return True
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    return int(tasks) > 1


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if "trainer" not in config or config.trainer not in TRAINERS:
        raise app.UsageError(f"config.trainer must be one of {sorted(TRAINERS)}, got {config.get('trainer')!r}")
    distributed = FLAGS.distributed if FLAGS.distributed is not None else multi_host_environment()
    if distributed:
        import jax

        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    trainer = importlib.import_module(TRAINERS[config.trainer])
    trainer.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
