"""launch/tpu.py against a fake `gcloud` first on PATH.

The fake records its argv (one JSON line per call) and answers `queued-resources describe` with canned
states. With FAKE_GCLOUD_EXEC=1 it also plays a one-worker slice on this machine: `tpu-vm ssh --command`
runs the command with bash (HOME is the test's directory) and `tpu-vm scp` copies the file there, so the
shell scripts that `setup`, `run`, `logs`, `status` and `stop` send to the workers really run.
"""

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.py")
SETTINGS = ["--project=my-project-1", "--zone=us-central2-b", "--name=eqvae-test", "--accelerator=v4-32"]
LOC = ["--zone=us-central2-b", "--project=my-project-1"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "eqvae-test", *LOC]
QR = ["gcloud", "compute", "tpus", "queued-resources"]

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, shutil, subprocess, sys
    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_RECORD"], "a") as f:
        f.write(json.dumps(["gcloud"] + argv) + "\\n")
    if argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
        path = os.environ["FAKE_GCLOUD_STATES"]
        with open(path) as f:
            states = f.read().split()
        print(states[0])
        with open(path, "w") as f:
            f.write("\\n".join(states[1:] or states))
    elif os.environ.get("FAKE_GCLOUD_EXEC") and argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        command = next(a for a in argv if a.startswith("--command="))[len("--command="):]
        sys.exit(subprocess.run(["bash", "-c", command]).returncode)
    elif os.environ.get("FAKE_GCLOUD_EXEC") and argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        shutil.copy(argv[4], os.path.join(os.environ["HOME"], argv[5].split(":", 1)[1]))
    """)


@pytest.fixture
def gcloud(tmp_path):
    """(environment with the fake gcloud first on PATH, function returning the recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    record.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_RECORD=str(record),
               FAKE_GCLOUD_STATES=str(tmp_path / "states"), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "states").write_text("ACTIVE\n")

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in record.read_text().splitlines()]

    return env, calls


def tpu(env, *args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, TPU, *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def command_of(call: list[str]) -> str:
    return next(a for a in call if a.startswith("--command="))[len("--command="):]


def assert_bash_syntax(script: str) -> None:
    done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + script


@pytest.mark.parametrize("flag, expected", [([], []), (["--spot"], ["--spot"]), (["--reserved"], ["--reserved"])])
def test_create_builds_the_queued_resource_request(gcloud, flag, expected):
    env, calls = gcloud
    tpu(env, *SETTINGS, "create", *flag)
    assert calls() == [QR + ["create", "eqvae-test", *LOC, "--node-id=eqvae-test", "--accelerator-type=v4-32",
                             "--runtime-version=tpu-ubuntu2204-base", *expected]]


@pytest.mark.parametrize("accelerator, gcloud_type, runtime", [
    ("v5p-8", "v5p-8", "v2-alpha-tpuv5"), ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5litepod-4", "v5litepod-4", "v2-alpha-tpuv5-lite"), ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
])
def test_runtime_version_follows_the_accelerator(gcloud, accelerator, gcloud_type, runtime):
    env, calls = gcloud
    tpu(env, *SETTINGS, f"--accelerator={accelerator}", "--queued-resource=qr-1", "create")
    assert calls() == [QR + ["create", "qr-1", *LOC, "--node-id=eqvae-test", f"--accelerator-type={gcloud_type}",
                             f"--runtime-version={runtime}"]]


def test_settings_from_env_file_and_environment_flags_win(gcloud, tmp_path):
    env, calls = gcloud
    env_file = tmp_path / "tpu.env"
    env_file.write_text("# my slice\nexport TPU_PROJECT=file-project\nTPU_ZONE='europe-west4-a'\n"
                        "TPU_NAME=from-file  # comment\nTPU_ACCELERATOR=v5p-8\n")
    env = dict(env, TPU_ZONE="us-east5-a", TPU_RUNTIME_VERSION="v2-alpha-tpuv5-custom")
    tpu(env, "--env", str(env_file), "--name=from-flag", "create")
    assert calls() == [QR + ["create", "from-flag", "--zone=europe-west4-a", "--project=file-project",
                             "--node-id=from-flag", "--accelerator-type=v5p-8",
                             "--runtime-version=v2-alpha-tpuv5-custom"]]
    # The example file shipped with the project parses.
    tpu(env, "--env", os.path.join(ROOT, "launch", "tpu.env.example"), "--dry-run", "create")


def test_wait_polls_until_active(gcloud, tmp_path):
    env, calls = gcloud
    (tmp_path / "states").write_text("WAITING_FOR_RESOURCES\nWAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    done = tpu(env, *SETTINGS, "wait", "--interval=0")
    describe = QR + ["describe", "eqvae-test", *LOC, "--format=value(state.state)"]
    assert calls() == [describe] * 4
    assert done.stdout.splitlines() == [f"queued resource eqvae-test: {s}" for s in
                                        ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")]


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_wait_fails_on_failed_or_suspended(gcloud, tmp_path, state):
    env, calls = gcloud
    (tmp_path / "states").write_text(f"PROVISIONING\n{state}\n")
    done = tpu(env, *SETTINGS, "wait", "--interval=0", check=False)
    assert done.returncode == 1 and f"is {state}" in done.stderr and len(calls()) == 2


def test_wait_times_out(gcloud, tmp_path):
    env, calls = gcloud
    (tmp_path / "states").write_text("WAITING_FOR_RESOURCES\n")
    start = time.monotonic()
    done = tpu(env, *SETTINGS, "wait", "--interval=0.2", "--timeout=1", check=False)
    assert done.returncode == 1 and "timed out after 1 s" in done.stderr
    assert 2 <= len(calls()) <= 10 and time.monotonic() - start < 30


def test_delete_and_status_and_logs_commands(gcloud):
    env, calls = gcloud
    tpu(env, *SETTINGS, "delete")
    tpu(env, *SETTINGS, "logs", "--worker=3", "--follow", "-n", "20")
    tpu(env, *SETTINGS, "logs")
    tpu(env, *SETTINGS, "status")
    tpu(env, *SETTINGS, "stop")
    tpu(env, *SETTINGS, "stop", "--kill", "--job=eval")
    got = calls()
    assert got[0] == QR + ["delete", "eqvae-test", *LOC, "--force", "--quiet"]
    assert got[1] == SSH + ["--worker=3", "--command=tail -F -n 20 ~/eqvae-jax-logs/train.log"]
    assert got[2] == SSH + ["--worker=0", "--command=tail -n 100 ~/eqvae-jax-logs/train.log"]
    assert got[3] == QR + ["describe", "eqvae-test", *LOC, "--format=value(state.state)"]
    assert got[4][:-1] == SSH + ["--worker=all"] and "~/eqvae-jax-logs/train.pid" in command_of(got[4])
    for call, sig, job in ((got[5], "TERM", "train"), (got[6], "KILL", "eval")):
        assert call[:-1] == SSH + ["--worker=all"]
        assert f"kill -{sig} -- -$(cat ~/eqvae-jax-logs/{job}.pid)" in command_of(call)
    for call in got[4:]:
        assert_bash_syntax(command_of(call))


def test_run_starts_the_same_detached_command_on_all_workers(gcloud):
    env, calls = gcloud
    job = ["python", "-m", "eqvae_jax.main", "--config=configs/sdvae_ft.py", "--workdir=gs://b/run 1"]
    tpu(env, *SETTINGS, "run", "--gcs-logs=gs://b/logs/", "--set-env", "JAX_LOG=1", "--", *job)
    (call,) = calls()
    assert call[:-1] == SSH + ["--worker=all"]
    script = command_of(call)
    assert_bash_syntax(script)
    inner = f"cd ~/eqvae-jax && . .venv/bin/activate && export JAX_LOG=1; exec {shlex.join(job)}"
    assert f"setsid nohup bash -c {shlex.quote(inner)} > ~/eqvae-jax-logs/train.log 2>&1 < /dev/null &" in script
    assert "gcloud storage cp --quiet ~/eqvae-jax-logs/train.log gs://b/logs/train.worker-$W.log" in script


def test_dry_run_prints_every_command_and_runs_none(gcloud):
    env, calls = gcloud
    out = tpu(env, *SETTINGS, "--dry-run", "create", "--spot").stdout
    assert out.strip() == ("gcloud compute tpus queued-resources create eqvae-test --zone=us-central2-b "
                           "--project=my-project-1 --node-id=eqvae-test --accelerator-type=v4-32 "
                           "--runtime-version=tpu-ubuntu2204-base --spot")
    out = tpu(env, *SETTINGS, "--dry-run", "setup").stdout.splitlines()
    assert out[0].startswith("gcloud compute tpus tpu-vm scp ") and out[0].endswith(
        " eqvae-test:eqvae-jax.tar.gz --zone=us-central2-b --project=my-project-1 --worker=all")
    assert shlex.split(out[1])[:-1] == SSH + ["--worker=all"]
    out = tpu(env, *SETTINGS, "--dry-run", "wait").stdout
    assert out.strip() == shlex.join(QR + ["describe", "eqvae-test", *LOC, "--format=value(state.state)"])
    assert calls() == []


def test_setup_from_git(gcloud):
    env, calls = gcloud
    tpu(env, *SETTINGS, "setup", "--git", "https://github.com/me/eqvae-jax.git", "--ref", "v1")
    (call,) = calls()
    assert call[:-1] == SSH + ["--worker=all"]
    script = command_of(call)
    assert_bash_syntax(script)
    assert "git clone --quiet https://github.com/me/eqvae-jax.git ~/eqvae-jax" in script
    assert script.endswith("cd ~/eqvae-jax && bash launch/setup.sh --tpu")


@pytest.mark.parametrize("args, message", [
    (["--accelerator=v3-8", "create"], "unknown accelerator type 'v3-8'"),
    (["--accelerator=v5p-12", "create"], "multiple of 8"),
    (["--accelerator=v6e-2", "create"], "v6e slices have 1, 4, 8"),
    (["--accelerator=tpu", "status"], "unknown accelerator type 'tpu'"),
    (["--zone=", "create"], "missing --zone (TPU_ZONE)"),
    (["--zone=us-central2", "create"], "zone 'us-central2' is not a zone name"),
    (["--project=", "delete"], "missing --project (TPU_PROJECT)"),
    (["--project=My_Project", "delete"], "not a valid project ID"),
    (["--name=Eqvae", "create"], "TPU name 'Eqvae' is not allowed"),
    (["--name=1eqvae", "create"], "TPU name '1eqvae' is not allowed"),
    (["--name=eqvae-", "create"], "TPU name 'eqvae-' is not allowed"),
    (["--name=" + "a" * 64, "create"], "is not allowed: 1-63 characters"),
    (["--queued-resource=q_1", "create"], "TPU queued resource 'q_1' is not allowed"),
    (["logs", "--worker=4"], "--worker 4: v4-32 has 4 worker(s), 0..3"),
    (["--accelerator=v5p-8", "logs", "--worker=1"], "v5p-8 has 1 worker(s)"),
    (["--accelerator=v6e-16", "logs", "--worker=4"], "v6e-16 has 4 worker(s)"),
    (["run"], "give the command after --"),
    (["run", "--set-env", "1X=2", "--", "python"], "expected NAME=VALUE"),
    (["run", "--gcs-logs=/tmp/x", "--", "python"], "expected a gs:// URL"),
    (["wait", "--timeout=0"], "--timeout must be > 0"),
    (["--remote-dir=a b", "setup"], "remote dir 'a b'"),
])
def test_bad_input_is_one_clear_line_before_any_gcloud_call(gcloud, args, message):
    env, calls = gcloud
    settings = [s for s in SETTINGS if not any(a.startswith(s.split("=")[0] + "=") for a in args)]
    done = tpu(env, *settings, *args, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert calls() == []


def test_create_needs_an_accelerator_and_env_file_errors(gcloud, tmp_path):
    env, calls = gcloud
    done = tpu(env, "--project=my-project-1", "--zone=us-central2-b", "--name=x1", "create", check=False)
    assert done.returncode == 2 and "missing --accelerator (TPU_ACCELERATOR)" in done.stderr
    bad = tmp_path / "bad.env"
    bad.write_text("TPU_ZONE=us-central2-b\nTPU_ACCELERATORS=v4-8\n")
    done = tpu(env, "--env", str(bad), "status", check=False)
    assert done.returncode == 2 and "bad.env:2: expected one of" in done.stderr
    done = tpu(env, "--env", str(tmp_path / "missing.env"), "status", check=False)
    assert done.returncode == 2 and "cannot read env file" in done.stderr
    assert calls() == []


def test_worker_scripts_run_on_a_one_worker_fake_slice(gcloud, tmp_path):
    """setup unpacks this checkout and runs launch/setup.sh, run starts a detached job in the venv, logs and
    status see it, a second run is refused, stop SIGTERMs it."""
    env, calls = gcloud
    env = dict(env, FAKE_GCLOUD_EXEC="1")
    home = tmp_path / "home"
    project = home / "eqvae-jax"
    venv_bin = project / ".venv" / "bin"
    venv_bin.mkdir(parents=True)  # a stand-in venv: setup.sh's pip calls only log their arguments
    (venv_bin / "activate").write_text(f"export PATH={venv_bin}:$PATH ACTIVATED=yes\n")
    (venv_bin / "python").write_text(f"#!/bin/bash\necho \"python $*\" >> {home}/venv.log\n")
    (venv_bin / "python").chmod(0o755)
    settings = [*SETTINGS[:3], "--accelerator=v5p-8"]
    tpu(env, *settings, "setup")
    assert (project / "launch" / "tpu.py").is_file() and (project / "eqvae_jax" / "main.py").is_file()
    assert not (home / "eqvae-jax.tar.gz").exists()
    installs = (home / "venv.log").read_text()
    assert "-m pip install -q -r requirements.txt" in installs and 'jax[tpu]==' in installs

    job = [sys.executable, "-c", "import os, signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
           "print('started', os.environ['ACTIVATED'], os.environ['EXTRA'], os.getcwd(), flush=True)\n"
           "time.sleep(60)"]
    out = tpu(env, *settings, "run", "--set-env=EXTRA=x y", "--", *job).stdout
    assert "started train" in out
    log = home / "eqvae-jax-logs" / "train.log"
    deadline = time.time() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, "job did not start"
        time.sleep(0.1)
    assert log.read_text().split() == ["started", "yes", "x", "y", str(project)]
    again = tpu(env, *settings, "run", "--", "true", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    assert "train running" in tpu(env, *settings, "status").stdout
    assert "started yes" in tpu(env, *settings, "logs").stdout
    assert "sent SIGTERM" in tpu(env, *settings, "stop").stdout
    deadline = time.time() + 30
    while "not running" not in tpu(env, *settings, "status").stdout:
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    assert "got SIGTERM" in log.read_text()


def test_precompile_runs_the_job_here_in_compile_only_mode(gcloud, tmp_path):
    env, calls = gcloud
    libtpu = tmp_path / "libtpu_aot"
    (libtpu / "libtpu").mkdir(parents=True)
    show = [sys.executable, "-c", "import os; print(' '.join(os.environ[k] for k in ('EQVAE_COMPILE_ONLY_TOPOLOGY', "
            "'JAX_PLATFORMS', 'LIBTPU_INIT_ARGS')), os.environ['PYTHONPATH'].split(os.pathsep)[0], os.getcwd())"]
    out = tpu(env, "--accelerator=v5e-16", "precompile", f"--libtpu={libtpu}", "--", *show).stdout.split()
    assert out == ["v5litepod-16", "cpu", "--xla_tpu_use_enhanced_launch_barrier=true", str(libtpu), ROOT]
    dry = tpu(env, "--accelerator=v5p-8", "--dry-run", "precompile", f"--libtpu={libtpu}", "--", "python",
              "my_job.py", "--workdir=gs://b/r").stdout.strip()
    assert dry.startswith("EQVAE_COMPILE_ONLY_TOPOLOGY=v5p-8 JAX_PLATFORMS=cpu ") and dry.endswith(
        " python my_job.py --workdir=gs://b/r")
    failing = tpu(env, "--accelerator=v5p-8", "precompile", f"--libtpu={libtpu}", "--", sys.executable, "-c",
                  "raise SystemExit(3)", check=False)
    assert failing.returncode == 3
    # A job without the compile-only mode refuses it (it would train here instead).
    dit = tpu(env, "--accelerator=v5p-8", "precompile", f"--libtpu={libtpu}", "--", sys.executable, "-m",
              "eqvae_jax.main", "--config=configs/dit.py:tiny", f"--workdir={tmp_path / 'dit'}", check=False)
    assert dit.returncode == 2 and "trainer 'dit' has no compile-only mode" in dit.stderr, dit.stderr
    assert not (tmp_path / "dit").exists()
    for args, message in ((["--accelerator=v5p-8", "precompile", f"--libtpu={tmp_path}", "--", "true"],
                           "no libtpu package there"),
                          (["--accelerator=v5p-8", "precompile", f"--libtpu={libtpu}"], "give the job's command"),
                          (["precompile", f"--libtpu={libtpu}", "--", "true"], "missing --accelerator")):
        done = tpu(env, *args, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert calls() == []
