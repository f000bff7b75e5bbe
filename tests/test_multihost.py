"""Multi-host JAX for real on one machine: 2 processes x 4 CPU devices (gloo collectives) on localhost.

The tiny EQ-VAE job (every micro-step on the equivariance branch) and the tiny DiT job run through
`python -m eqvae_jax.main` in two processes that find each other
through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (eqvae_jax.parallel.distributed). Each
run: per-process data shards, a multi-host checkpoint, SIGTERM to process 1 only (both processes stop at the
same step through JAX's preemption sync and save), a fresh 2-process start that resumes to the end (the
EQ-VAE one with held-out eval, image summaries and the diffusers export on process 0, and no library INFO lines
in either run's logs; the DiT one after the
stop step's array file written by process 1 was damaged, so both processes must agree to fall back to the
previous step), and the final train state compared with the same job run by one process on 8 devices.

Tolerance: the two runs see the same global batches and random draws, but the cross-device reductions of a
multi-process CPU job run through gloo instead of the in-process CPU collectives, and float32 sums taken in
another order round differently: the states agree to rounding grown over the steps, not bit for bit (measured:
up to 2e-5 of a leaf's scale for EQ-VAE's 8 micro-steps, 7e-5 for DiT's 40 steps; the tests run 4 and 16). Every float
leaf must agree to 5e-4 of its largest magnitude (+1e-6); a per-element relative tolerance means nothing for
elements that are sums cancelling to near zero. Integer leaves and the host state must be equal. Skipped: the
attention key biases, whose gradient is zero in exact arithmetic (adding q.b_k to all logits of a query leaves its
softmax unchanged), so what Adam does with them is normalised rounding noise, +-lr per step, different in every
summation order and without effect on any output.
"""

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from cpu_devices import xla_flags
from helpers import EQ_ONE_MICRO_STEP, config_flags, jax_cache, tiny_dit_config, tiny_eqvae_config, write_toy_cache
from helpers import REPO as ROOT

from eqvae_jax.train.checkpointing import Checkpointer
from eqvae_jax.train.dit import job as dit_job
from eqvae_jax.train.eqvae import job as eqvae_job

flags.FLAGS.mark_as_parsed()
pytestmark = pytest.mark.slow
SUITE_SECONDS = 320  # rough wall time on 2 cores: conftest starts the longest modules first

PROCESSES, LOCAL_DEVICES = 2, 4
RTOL, ATOL = 5e-4, 1e-6  # relative to each leaf's largest magnitude; absolute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Job:
    """The same command in PROCESSES processes, each with LOCAL_DEVICES CPU devices and its own log file."""

    def __init__(self, args: list[str], logdir: str, name: str):
        port = free_port()
        self.logs = [os.path.join(logdir, f"{name}.{i}.log") for i in range(PROCESSES)]
        self.procs = []
        for i in range(PROCESSES):
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i),
                       XLA_FLAGS=xla_flags(LOCAL_DEVICES),
                       MPLCONFIGDIR=self.font_cache(logdir, name, i))  # a fresh machine: no font cache yet
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "eqvae_jax.main", *args], cwd=ROOT,
                                                   env=env, stdout=log, stderr=subprocess.STDOUT))

    @staticmethod
    def font_cache(logdir: str, name: str, i: int) -> str:
        """Process i's matplotlib cache directory, empty at its start: a process that imports matplotlib builds
        its font cache there, which matplotlib announces at INFO level."""
        return os.path.join(logdir, f"{name}.{i}.mpl")

    def log(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.log(i)[-3000:]}" for i in range(PROCESSES))

    def wait_for(self, i: int, text: str, timeout: float = 900, count: int = 1) -> None:
        deadline = time.time() + timeout
        while self.log(i).count(text) < count:
            if any(p.poll() is not None for p in self.procs) or time.time() > deadline:
                self.kill()
                pytest.fail(f"process {i} never logged {text!r}\n{self.tails()}")
            time.sleep(0.2)

    def finish(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"timed out\n{self.tails()}")
        codes = [p.returncode for p in self.procs]
        assert codes == [0] * PROCESSES, f"exit codes {codes}\n{self.tails()}"

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def stopped_step(job: Job, text: str) -> int:
    """The update both processes stopped at (they must agree)."""
    steps = set()
    for i in range(PROCESSES):
        line = next((ln for ln in job.log(i).splitlines() if text in ln), None)
        assert line is not None, f"process {i} did not stop\n{job.tails()}"
        steps.add(int(line.rsplit(text, 1)[1].split()[0].strip("(,")))
    assert len(steps) == 1, steps
    return steps.pop()


def compared(path, a: np.ndarray) -> np.ndarray:
    """Elements to compare: all but attention key biases (the VAE's k.bias, the k third of DiT's qkv.bias),
    in the parameters and everything that mirrors them (EMA, optimizer moments)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    pairs = set(zip(names, names[1:], strict=False))
    keep = np.ones(a.shape, bool)
    if ("k", "bias") in pairs:
        keep[...] = False
    elif ("qkv", "bias") in pairs:
        third = a.shape[-1] // 3
        keep[..., third:2 * third] = False
    return keep


def assert_states_close(multi, single) -> None:
    flat_m = jax.tree_util.tree_leaves_with_path(jax.device_get(multi))
    flat_s = jax.tree_util.tree_leaves_with_path(jax.device_get(single))
    assert len(flat_m) == len(flat_s)
    worst, skipped = (0.0, ""), 0
    for (path, a), (_, b) in zip(flat_m, flat_s, strict=True):
        name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if not np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        keep = compared(path, a)
        skipped += int((~keep).sum())
        scale = float(np.max(np.abs(b[keep]), initial=0.0))
        diff = float(np.max(np.abs(a[keep] - b[keep]), initial=0.0))
        assert diff <= RTOL * scale + ATOL, f"{name}: max difference {diff:.3g} at scale {scale:.3g}"
        worst = max(worst, (diff / (scale + ATOL), name))
    print(f"max |multi - single| / leaf scale: {worst[0]:.3g} ({worst[1]}); {skipped} key-bias elements skipped")


def restore_final(directory: str, step: int, target):
    ckpt = Checkpointer(directory)
    try:
        assert ckpt.latest_step() == step
        return ckpt.restore(step, target)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    return jax_cache()


def test_eqvae_two_processes_sigterm_resume_equals_one_process(compile_cache, tmp_path):
    workdir = str(tmp_path / "multi")
    # Every micro-step on the equivariance branch (the branch EQ-VAE adds): one generator and one discriminator
    # program per run instead of five, as a multi-process CPU job compiles everything in every process (no
    # persistent cache). The plain and low-resolution branches run multi-device in test_eqvae_train.py. One
    # micro-step per update (EQ_ONE_MICRO_STEP): each multi-process CPU micro-step costs both cores seconds of gloo
    # traffic (alone: 90 -> 72 s for this test with 4 micro-steps instead of 8).
    total = 4
    common = ["--config=configs/sdvae_ft.py:tiny", f"--workdir={workdir}",
              f"--config.compilation_cache_dir={compile_cache}", f"--config.data.data_dir={tmp_path}/tfds",
              f"--config.total_updates={total}", *config_flags(EQ_ONE_MICRO_STEP), "--config.export_diffusers=false"]
    quiet = ["--config.eval.batches=0", "--config.eval.images=0"]
    first = Job(common + quiet, str(tmp_path), "first")
    # Process 1 alone is told to stop once training is under way; both must stop at the same update and save.
    first.wait_for(1, f"update 1/{total} ")
    first.procs[1].send_signal(signal.SIGTERM)
    first.finish()
    stop = stopped_step(first, "eqvae: stopped at update")
    assert 0 < stop < total
    assert str(stop) in os.listdir(os.path.join(workdir, "checkpoints"))

    # A fresh start resumes; at the end: held-out eval, image summaries and the diffusers export (process 0).
    second = Job(common[:-1] + ["--config.export_diffusers=true"], str(tmp_path), "second")
    second.finish()
    assert f"resumed at update {stop}" in second.log(0) and f"resumed at update {stop}" in second.log(1)
    assert f"eval at update {total}" in second.log(0)
    assert os.path.isfile(os.path.join(workdir, "export", "diffusers", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(workdir, "reconstructions.png"))
    # library INFO logs (absl, Orbax, XLA's C++ I0000 lines, matplotlib building a font cache on a fresh
    # machine) are off by default
    for job in (first, second):
        for i in range(PROCESSES):
            assert "I0000" not in job.log(i) and "orbax" not in job.log(i).lower(), job.tails()
            assert "fontManager" not in job.log(i), job.tails()

    # one process, 8 devices, the same job
    config = tiny_eqvae_config(compile_cache, export_diffusers=False, total_updates=total,
                               **{"data.data_dir": f"{tmp_path}/tfds", "eval.batches": 0, **EQ_ONE_MICRO_STEP})
    single = eqvae_job.run(config, str(tmp_path / "single"))
    assert single["updates"] == total and single["g_variants"] == single["d_variants"] == 1
    multi, reference = (restore_final(os.path.join(d, "checkpoints"), total, single["state"])
                        for d in (workdir, str(tmp_path / "single")))
    assert multi.host == reference.host  # the transform sampler's state and the update
    assert_states_close(multi.state, single["state"])


def test_dit_two_processes_sigterm_resume_equals_one_process(compile_cache, tmp_path):
    cache = str(tmp_path / "latents")
    write_toy_cache(cache)
    workdir = str(tmp_path / "multi")
    total = 16  # every update of a 2-process CPU job costs both cores (gloo), so no more than the test needs
    args = ["--config=configs/dit.py:tiny", f"--workdir={workdir}", f"--config.latents.cache_dir={cache}",
            f"--config.compilation_cache_dir={compile_cache}", f"--config.total_updates={total}",
            "--config.checkpoint.every_updates=4", "--config.log.every_updates=2"]
    first = Job(args, str(tmp_path), "first")
    first.wait_for(1, "| loss ", count=3)  # the third progress line (update 6): step 4 is saved
    first.procs[1].send_signal(signal.SIGTERM)
    first.finish()
    stop = stopped_step(first, "dit: stopped at update")
    assert 6 <= stop < total

    # The stop step's arrays written by process 1 are damaged: process 1 cannot read them, process 0 may not need
    # to. Both must fall back to the same older step (and move the damaged one aside once).
    checkpoints = os.path.join(workdir, "checkpoints")
    shards = glob.glob(os.path.join(checkpoints, str(stop), "state", "ocdbt.process_1", "d", "*"))
    assert shards, os.listdir(os.path.join(checkpoints, str(stop), "state"))
    with open(max(shards, key=os.path.getsize), "r+b") as f:
        f.truncate(100)
    older = max(s for s in map(int, filter(str.isdigit, os.listdir(checkpoints))) if s < stop)

    second = Job(args, str(tmp_path), "second")
    second.finish()
    for i in range(PROCESSES):
        assert f"resumed at update {older}" in second.log(i), second.tails()
    assert f"step {stop} does not restore" in second.log(0)
    assert os.path.isdir(os.path.join(checkpoints, f"{stop}.damaged")), os.listdir(checkpoints)

    config = tiny_dit_config(cache, compile_cache, total_updates=total,
                             **{"checkpoint.every_updates": 4, "log.every_updates": 2})
    single = dit_job.run(config, str(tmp_path / "single"))["state"]
    multi = restore_final(os.path.join(workdir, "checkpoints"), total, single)
    assert_states_close(multi.state, single)
