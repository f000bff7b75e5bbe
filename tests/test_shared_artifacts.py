"""Shared artifacts made by several processes at once, and one process's failure told to the others.

- Two plain processes prepare the demo TFDS dataset into the same fresh data_dir at the same moment, ROUNDS
  times: the lost final rename counts as success (`data.tfds_prepare`).
- Two processes of one JAX job (gloo on localhost) open the demo source through the production path, ROUNDS
  times, each round on a fresh data_dir and started together at a barrier: process 0 prepares, the other waits
  and opens it (`parallel.coordination.make_once`).
- The EQ-VAE job in two processes where one cannot prepare its data: the other stops within seconds with a
  message naming the failed process and its error (instead of a 30 s gloo time-out).
- An atomic conversion output that another process finished first.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from cpu_devices import compile_flags, xla_flags
from helpers import REPO

from eqvae_jax.convert.atomic import atomic_path

ROUNDS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def finish(procs: list[subprocess.Popen], logs: list[str], timeout: float = 600) -> list[str]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("timed out\n" + "\n".join(read(log)[-3000:] for log in logs))
    texts = [read(log) for log in logs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(t[-3000:] for t in texts)
    return texts


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def assert_prepared_once(root: str) -> None:
    """One complete version directory per round, and no private copy left behind."""
    for r in range(ROUNDS):
        entries = sorted(os.listdir(os.path.join(root, f"round{r}", "eqvae_demo")))
        assert entries == ["1.0.0"], entries
        assert os.path.isfile(os.path.join(root, f"round{r}", "eqvae_demo", "1.0.0", "dataset_info.json"))


# TFDS checks that the target does not exist, then renames: a window of microseconds, hit once in CI under load.
# The scripts below widen it (os.rename sleeps first) so that every round of concurrent preparations collides.
WIDEN_RACE = """
    import os, time
    _rename = os.rename
    def _slow_rename(*args, **kwargs):
        time.sleep(0.3)
        return _rename(*args, **kwargs)
    os.rename = _slow_rename
"""

# Each process imports first, then for every round waits for the go file and prepares at once.
PLAIN = WIDEN_RACE + """
    import sys
    from eqvae_jax.data import demo
    root, me = sys.argv[1], sys.argv[2]
    for r in range({rounds}):
        go = os.path.join(root, f"go{{r}}")
        while not os.path.exists(go):
            time.sleep(0.001)
        path = demo.prepare(os.path.join(root, f"round{{r}}"))
        with open(os.path.join(root, f"done{{r}}.{{me}}"), "w") as f:
            f.write(path)
"""


def test_two_plain_processes_prepare_the_same_data_dir_at_once(tmp_path):
    root = str(tmp_path)
    logs = [str(tmp_path / f"plain.{i}.log") for i in range(2)]
    code = PLAIN.format(rounds=ROUNDS)
    procs = []
    for i in range(2):
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), root, str(i)], cwd=REPO,
                                          stdout=f, stderr=subprocess.STDOUT))
    for r in range(ROUNDS):
        open(os.path.join(root, f"go{r}"), "w").close()
        deadline = time.time() + 120
        while not all(os.path.exists(os.path.join(root, f"done{r}.{i}")) for i in range(2)):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.01)
    finish(procs, logs)
    assert_prepared_once(root)


# Two processes of one JAX job: every round starts at a coordination-service barrier, then both open the demo
# source as a job does (data.sources.open_source -> demo.prepare -> make_once).
DISTRIBUTED = WIDEN_RACE + """
    import sys
    from eqvae_jax.parallel.distributed import maybe_initialize
    maybe_initialize()
    import jax
    from jax._src import distributed
    from eqvae_jax.data.config import DataConfig
    from eqvae_jax.data.sources import open_source
    root = sys.argv[1]
    for r in range({rounds}):
        distributed.global_state.client.wait_at_barrier(f"round{{r}}", 60_000)
        source = open_source(DataConfig(source="demo", data_dir=os.path.join(root, f"round{{r}}")), train=True)
        assert len(source) == 7, len(source)
    print("rounds done on process", jax.process_index())
"""


def test_two_jax_processes_prepare_the_same_data_dir_at_once(tmp_path):
    root, port = str(tmp_path), free_port()
    logs = [str(tmp_path / f"dist.{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), XLA_FLAGS=compile_flags())
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(DISTRIBUTED.format(rounds=ROUNDS)),
                                           root], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    texts = finish(procs, logs)
    assert all("rounds done" in t for t in texts)
    assert_prepared_once(root)


def job_processes(tmp_path, data_dirs: list[str]) -> tuple[list[subprocess.Popen], list[str]]:
    """The tiny EQ-VAE job in two processes; process i reads its data from data_dirs[i]."""
    port = free_port()
    procs, logs = [], []
    for i, data_dir in enumerate(data_dirs):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=xla_flags(4))
        logs.append(str(tmp_path / f"job.{i}.log"))
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py:tiny",
                 f"--workdir={tmp_path}/run", f"--config.data.data_dir={data_dir}"],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    return procs, logs


@pytest.mark.parametrize("bad", [0, 1])
def test_one_process_fails_the_other_stops_naming_it(tmp_path, bad):
    """Process `bad` cannot write its data_dir (a path below a regular file); the other one must stop soon
    after with `process <bad> of 2 failed: NotADirectoryError ...` and a non-zero status."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    dirs = [str(tmp_path / "tfds"), str(tmp_path / "tfds")]
    dirs[bad] = str(blocker / "tfds")
    procs, logs = job_processes(tmp_path, dirs)
    start = time.time()
    for p in procs:
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process did not stop\n" + "\n".join(read(log)[-3000:] for log in logs))
    took = time.time() - start
    texts = [read(log) for log in logs]
    other = 1 - bad
    assert procs[bad].returncode == 1, texts[bad][-3000:]
    assert procs[other].returncode == 1, texts[other][-3000:]
    assert "NotADirectoryError" in texts[bad]
    assert f"process {bad} of 2 failed" in texts[other] and "NotADirectoryError" in texts[other], texts[other][-3000:]
    assert "DEADLINE_EXCEEDED" not in texts[other] and "heartbeat" not in texts[other], texts[other][-3000:]
    assert took < 120, f"{took:.0f} s: the failure was not told to the other process"


def test_atomic_output_finished_first_by_another_process(tmp_path):
    dst = tmp_path / "weights"
    with pytest.raises(FileExistsError, match="another process"), atomic_path(dst) as tmp:
        os.makedirs(tmp)
        (tmp_path / "mine").write_text("")
        os.rename(tmp_path / "mine", os.path.join(tmp, "config.json"))
        os.makedirs(dst)  # the other process's rename lands first
        (dst / "config.json").write_text("theirs")
    assert (dst / "config.json").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["weights"]  # no temporary left

    with atomic_path(dst, overwrite=True) as tmp:  # --overwrite: the later output wins
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("mine")
        (dst / "config.json").write_text("theirs again")
    assert (dst / "config.json").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["weights"]

    out = tmp_path / "single.json"
    with pytest.raises(FileExistsError, match="another process"), atomic_path(out) as tmp:
        with open(tmp, "w") as f:
            f.write("mine")
        out.write_text("theirs")
    assert out.read_text() == "theirs"
