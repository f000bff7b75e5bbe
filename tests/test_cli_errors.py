"""A mistake in a command line or its config, in every absl CLI (main for the training and extraction jobs,
eval_vae, sample, the data pipeline's CLI) and argparse CLI (convert, eval_samples), and a workdir that cannot be
written (a file, under a file, a read-only place: /sys refuses even root): exit status 2, `error:` with the
problem (and "did you mean" where a close name exists), a few lines of stderr, no traceback. Each command ends
before any model is built; they run side by side."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

SUITE_SECONDS = 85  # 17 commands' start-up (imports), side by side on 2 cores
MAIN = [sys.executable, "-m", "eqvae_jax.main", "--workdir={tmp}/run"]
TINY = "--config=configs/sdvae_ft.py:tiny"
# (name, command, what stderr must say)
CASES = [
    ("variant", [*MAIN, "--config=configs/sdvae_ft.py:tinny"],
     "unknown config variant 'tinny' (did you mean 'tiny'?"),
    ("variant_value", [*MAIN, "--config=configs/sdvae_ft.py:vae=sdxxl"],
     "unknown value of config variant vae: 'sdxxl' (did you mean vae=sdxl?"),
    ("key", [*MAIN, TINY, "--config.global_batch_szie=4"],
     "unknown config key 'global_batch_szie' (did you mean 'global_batch_size'?)"),
    ("nested_key", [*MAIN, TINY, "--config.optim.lr=1"], "unknown config key 'optim.lr'"),
    ("type", [*MAIN, TINY, "--config.global_batch_size=abc"], "--config.global_batch_size=abc"),
    ("zero", [*MAIN, TINY, "--config.global_batch_size=0"], "global_batch_size must be positive, got 0"),
    ("negative", [*MAIN, TINY, "--config.total_updates=-3"], "total_updates must be positive, got -3"),
    ("no_file", [*MAIN, "--config=configs/nonexist.py"], "cannot load the config file: [Errno 2]"),
    ("flag", [*MAIN, TINY, "--workdirr=x"], "unknown flag --workdirr (did you mean --workdir?)"),
    ("extract", [*MAIN, "--config=configs/extract_latents.py:tiny", "--config.chunk_size=-1"],
     "chunk_size must be positive, got -1"),
    ("eval_vae_variant", [sys.executable, "-m", "eqvae_jax.eval_vae", "--config=configs/eval_vae.py:tinny",
                          "--workdir={tmp}/eval"], "unknown config variant 'tinny' (did you mean 'tiny'?"),
    ("eval_vae_key", [sys.executable, "-m", "eqvae_jax.eval_vae", "--config=configs/eval_vae.py:tiny",
                      "--workdir={tmp}/eval", "--config.batch_szie=3"], "unknown config key 'batch_szie'"),
    ("data", [sys.executable, "-m", "eqvae_jax.data", TINY, "--config.data.image_size=0"],
     "data.image_size must be positive, got 0"),
    ("workdir_file", [sys.executable, "-m", "eqvae_jax.main", TINY, "--workdir={tmp}/a_file"],
     "a_file is a file, not a directory"),
    ("workdir_unwritable", [sys.executable, "-m", "eqvae_jax.main", TINY, "--workdir=/sys/eqvae_jax_test"],
     "--workdir=/sys/eqvae_jax_test is not writable: Operation not permitted"),
    ("workdir_under_file", [sys.executable, "-m", "eqvae_jax.eval_vae", "--config=configs/eval_vae.py:tiny",
                            "--workdir={tmp}/a_file/eval"], "a_file/eval is not writable: Not a directory"),
    ("sample", [sys.executable, "-m", "eqvae_jax.sample", "--workdir={tmp}/run", "--num_steps=0"],
     "flag --num_steps=0: 0 is not a positive integer"),
    # the argparse commands
    ("eval_samples_flag", [sys.executable, "-m", "eqvae_jax.eval_samples", "--ref={tmp}/r.npz",
                           "--inception={tmp}/i", "--referance={tmp}/x"],
     "/x (did you mean --ref?)"),
    ("eval_samples_negative", [sys.executable, "-m", "eqvae_jax.eval_samples", "--ref={tmp}/r.npz",
                               "--inception={tmp}/i", "--batch_size=-8"],
     "argument --batch_size: must be >= 0 (0: the default), got -8"),
    ("convert_kind", [sys.executable, "-m", "eqvae_jax.convert", "--kind=kl_vea", "--src={tmp}/a_file",
                      "--dst={tmp}/out"], "invalid choice: 'kl_vea' (choose from"),
    ("convert_kind_hint", [sys.executable, "-m", "eqvae_jax.convert", "--kind=kl_vea", "--src={tmp}/a_file",
                           "--dst={tmp}/out"], "(did you mean 'kl_vae'?)"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: (returncode, stderr)} of every case, run concurrently (each distinct command once)."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    open(f"{tmp}/a_file", "w").close()
    commands = {name: tuple(a.format(tmp=tmp) for a in cmd) for name, cmd, _ in CASES}
    procs = {cmd: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in set(commands.values())}
    done = {cmd: (p.wait(timeout=300), p.stderr.read()) for cmd, p in procs.items()}
    return {name: done[cmd] for name, cmd in commands.items()}


@pytest.mark.parametrize("name,expected", [(name, expected) for name, _, expected in CASES])
def test_mistake_is_one_short_message_with_exit_status_2(results, name, expected):
    code, stderr = results[name]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 4 and lines[0].startswith("error:"), stderr[-3000:]
    assert expected in stderr, stderr


def test_a_config_mistake_is_reported_before_the_job_loads(tmp_path):
    """main parses the job's config before it imports the job (JAX, Flax, Orbax, Grain): on a fresh machine (no
    matplotlib font cache) the command prints only its own message and nothing else. (A job that imports
    matplotlib prints no 'generated new fontManager' line either: test_multihost.py starts its jobs without a
    font cache.)"""
    env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl"))
    done = subprocess.run([*MAIN[:-1], f"--workdir={tmp_path}/run", TINY, "--config.total_updates=0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith("error:") and "total_updates must be positive" in done.stderr, done.stderr
    assert not (tmp_path / "mpl").exists() or not os.listdir(tmp_path / "mpl")  # nothing drew or loaded keras
