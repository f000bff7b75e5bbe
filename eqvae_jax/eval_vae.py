"""The paper's reconstruction evaluation: python -m eqvae_jax.eval_vae --config=configs/eval_vae.py --workdir=DIR.

    python -m eqvae_jax.eval_vae --config=configs/eval_vae.py:models=sd_vae+eq_vae --workdir=gs://B/eval/sd_vs_eq \
        --config.inception=weights/inception --config.lpips=weights/lpips

rFID (50K reconstructions vs the 50K originals), PSNR, SSIM, LPIPS, the equivariance error per transform and
family, and the intrinsic dimension of the latents, for one or several KL / VQ autoencoders side by side
(eqvae_jax/train/eval_vae/job.py has the definitions). Results: DIR/results.json, DIR/results/<model>.json,
TensorBoard under DIR/tensorboard/<model>, DIR/comparison.png, and a table on the console.

Resumable: every shard of images is written to DIR/shards/ when done, and rerunning the same command
continues where a preempted run stopped (adding a model to the config later evaluates only that model). A
separate command rather than a `trainer` of `eqvae_jax.main`: the training loop's units (optimizer updates,
train state, Orbax checkpoints of it, a data iterator to resume mid-epoch) have nothing to hold here; the
resumable unit is a shard of results. Multi-host slices run the same command on every host (as main's jobs).
A config error, missing weights or data, or a workdir of another configuration ends with exit status 2.
"""

from __future__ import annotations

import os
import sys
import warnings

from absl import flags
from ml_collections import config_flags

from eqvae_jax import cli, host_malloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # should TFDS import TensorFlow: quietly
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def define_flags() -> None:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval_vae.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the evaluation's shards and results (local or gs://).")
    flags.DEFINE_bool("distributed", None, "Force (--distributed) or prevent (--nodistributed) "
                      "jax.distributed.initialize(); default: when JAX detects a multi-process TPU/Slurm/MPI job.")
    flags.DEFINE_string("log_level", "WARNING", "Level of library logs (absl, Grain, JAX, TF).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    import jax

    from eqvae_jax.eval.adm_metrics import EvaluationWarning
    from eqvae_jax.models.weights import KeyMismatchError
    from eqvae_jax.parallel.coordination import failures_shared
    from eqvae_jax.parallel.distributed import maybe_initialize
    from eqvae_jax.train.console import setup_logging
    from eqvae_jax.train.eval_vae.job import EvalVAEError, run
    from eqvae_jax.train.eval_vae.shards import ShardMismatchError
    from eqvae_jax.typed_config import ConfigError

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    host_malloc.tune_for_cpu()  # before JAX starts its backend
    f = flags.FLAGS
    setup_logging(f.log_level)
    if problem := cli.workdir_problem(f.workdir):
        cli.fail(problem)
    maybe_initialize(f.distributed)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvaluationWarning)
        handled = (ConfigError, EvalVAEError, ShardMismatchError, KeyMismatchError, FileNotFoundError)
        try:
            with failures_shared(handled):
                run(f.config, f.workdir)
        except handled as e:
            error = str(e)
    for w in caught:
        if not issubclass(w.category, EvaluationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif jax.process_index() == 0:
            print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
