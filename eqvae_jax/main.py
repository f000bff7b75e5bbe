"""Entry point of every job: python -m eqvae_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v].

The config's `trainer` field picks the job (its package's `job.run(config, workdir)`). Multi-host runs (TPU
pods) call `jax.distributed.initialize()` first; everything else (mesh, data sharding, checkpoints) follows from
the config. A config error or a missing weights dir ends the command with its message and exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from eqvae_jax import cli, host_malloc

# Should anything import TensorFlow (the jobs do not; TFDS may, preparing some datasets): no TF C++ INFO lines;
# TF's oneDNN notice is printed before its log level applies.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Job config file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports of this run.")
    flags.DEFINE_bool("distributed", None, "Force (--distributed) or prevent (--nodistributed) "
                      "jax.distributed.initialize(); default: when JAX detects a multi-process TPU/Slurm/MPI job.")
    flags.DEFINE_string("log_level", "WARNING", "Level of library logs (absl, Orbax, Grain, JAX, TF); INFO "
                        "restores them. The job's own progress lines are always shown.")
    flags.mark_flags_as_required(["config", "workdir"])


# Jobs with a compile-only mode for a TPU topology (launch/tpu.py precompile): their `precompile` module.
PRECOMPILE = {"eqvae": "eqvae_jax.train.eqvae.precompile", "eqvqgan": "eqvae_jax.train.eqvae.precompile"}
JOBS = {
    "eqvae": "eqvae_jax.train.eqvae.job",
    "eqvqgan": "eqvae_jax.train.eqvae.job",  # the same job for a VQGAN (its config schema: EQVQGANConfig)
    "extract_latents": "eqvae_jax.train.latents.job",
    "extract_tokens": "eqvae_jax.train.latents.job",
    "dit": "eqvae_jax.train.dit.job",
    "maskgit": "eqvae_jax.train.maskgit.job",
}


def main(argv: list[str]) -> None:
    from eqvae_jax.data.sources import DatasetFormatError
    from eqvae_jax.models.weights import KeyMismatchError
    from eqvae_jax.parallel import aot
    from eqvae_jax.parallel.coordination import failures_shared
    from eqvae_jax.parallel.distributed import maybe_initialize
    from eqvae_jax.train.console import setup_logging
    from eqvae_jax.train.errors import CheckpointError, ResumeError
    from eqvae_jax.typed_config import ConfigError

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    host_malloc.tune_for_cpu()  # before JAX starts its backend
    setup_logging(FLAGS.log_level)
    config = FLAGS.config
    if "trainer" not in config or config.trainer not in JOBS:
        cli.fail(f"config.trainer must be one of {sorted(JOBS)}, got {config.get('trainer')!r}")
    target = aot.compile_only_target()
    if target and config.trainer not in PRECOMPILE:
        print(f"error: trainer {config.trainer!r} has no compile-only mode ({aot.ENV_TOPOLOGY}={target}); "
              f"jobs with one: {sorted(PRECOMPILE)}", file=sys.stderr)
        sys.exit(2)
    if problem := cli.workdir_problem(FLAGS.workdir):  # creates the workdir: only for a command that will run
        cli.fail(problem)
    if not target:
        maybe_initialize(FLAGS.distributed)
    handled = (ConfigError, ResumeError, KeyMismatchError, CheckpointError, DatasetFormatError)
    try:
        with failures_shared(handled):  # a multi-process job: one process's error stops all, with that error
            if target:
                importlib.import_module(PRECOMPILE[config.trainer]).precompile(config, FLAGS.workdir, target)
            else:
                job = JOBS[config.trainer]
                # The config is parsed by the job package's schema before the job's modules load (JAX, Flax,
                # Orbax, Grain: about 2 s), so a config mistake ends the command sooner; the job takes the parsed
                # config.
                parsed = importlib.import_module(job.rsplit(".", 1)[0] + ".config").parse_config(config)
                importlib.import_module(job).run(parsed, FLAGS.workdir)
    except handled as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, CheckpointError) else 2)  # 2: the command's inputs; 1: its checkpoints


if __name__ == "__main__":
    define_flags()
    cli.run(main)
