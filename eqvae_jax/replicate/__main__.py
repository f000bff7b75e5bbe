"""python -m eqvae_jax.replicate --config=configs/replicate.py[:smoke|:tpu|:kl|:vq] --workdir=DIR

Runs (or resumes) the whole replication chain (eqvae_jax/replicate/stages.py, docs/replication.md). A config
error in any stage's derived job config ends the command before anything is built, with exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from eqvae_jax import cli, storage

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FLAGS = flags.FLAGS


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "configs/replicate.py[:smoke|:tpu|:kl|:vq]", lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's directory: one subdirectory per stage, the report at its root.")
    flags.DEFINE_string("log_level", "WARNING", "Level of library logs; the stages' progress lines are always shown.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    from eqvae_jax.replicate.chain import replicate
    from eqvae_jax.train.console import setup_logging
    from eqvae_jax.train.loop import ResumeError
    from eqvae_jax.typed_config import ConfigError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if storage.is_url(FLAGS.workdir):  # its stages share files through the local disk (caches, features, figures)
        cli.fail(f"--workdir={FLAGS.workdir}: the replication runs in a local directory (one VM); copy it to a "
                 "bucket afterwards, e.g. gcloud storage cp -r DIR gs://BUCKET/...")
    setup_logging(FLAGS.log_level)
    try:
        replicate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
