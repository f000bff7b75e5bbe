#!/usr/bin/env python3
"""Cloud TPU VM slices for eqvae-jax: create, wait, setup, run, logs, status, stop, delete, precompile.

    python launch/tpu.py --env launch/tpu.env create --spot
    python launch/tpu.py --env launch/tpu.env wait
    python launch/tpu.py --env launch/tpu.env setup                  # copy this checkout, install on all workers
    python launch/tpu.py --env launch/tpu.env run -- python -m eqvae_jax.main --config=configs/sdvae_ft.py \\
        --workdir=gs://BUCKET/eqvae_sdvae
    python launch/tpu.py --env launch/tpu.env logs --follow [--worker 1]
    python launch/tpu.py --env launch/tpu.env stop                   # SIGTERM: the job checkpoints and exits
    python launch/tpu.py --env launch/tpu.env delete
    python launch/tpu.py --env launch/tpu.env precompile -- python -m eqvae_jax.main ...   # here, no TPU

Settings come from flags, else the --env file, else TPU_* environment variables (TPU_PROJECT, TPU_ZONE,
TPU_NAME, TPU_ACCELERATOR, TPU_RUNTIME_VERSION, TPU_QUEUED_RESOURCE, TPU_REMOTE_DIR); see tpu.env.example.
Every input is checked before the first gcloud command runs (bad input: a one-line error, exit status 2).
--dry-run prints the gcloud commands instead of running them.

Uses only the Python standard library and the gcloud CLI: it runs on a laptop without JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------------------
# Accelerator types
# --------------------------------------------------------------------------------------------------------

# Runtime (software) versions per TPU generation for JAX on TPU VMs.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
# v5e/v6e slice sizes (chips); single-host up to 8 chips (1/4/8-chip VMs), larger slices use 4-chip VMs.
LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
# v4/v5p: the size counts TensorCores (2 per chip); 4 chips (8 cores) per VM; the largest pod slices.
MAX_CORES = {"v4": 4096, "v5p": 12288}
STATES_WAITING = ("ACCEPTED", "CREATING", "WAITING_FOR_RESOURCES", "PROVISIONING")
STATES_FAILED = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any gcloud command runs."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    generation: str  # v4, v5p, v5e, v6e
    size: int  # the number in the type: TensorCores for v4/v5p, chips for v5e/v6e
    gcloud_type: str  # what gcloud accepts (v5e-N is spelled v5litepod-N)

    @property
    def chips(self) -> int:
        return self.size // 2 if self.generation in MAX_CORES else self.size

    @property
    def workers(self) -> int:
        """TPU VMs (hosts) in the slice: each runs one JAX process."""
        if self.generation in MAX_CORES:
            return self.chips // 4
        return 1 if self.size <= 8 else self.size // 4

    @property
    def runtime_version(self) -> str:
        return RUNTIME_VERSIONS[self.generation]


def parse_accelerator(text: str) -> Accelerator:
    """'v5p-8', 'v4-32', 'v5litepod-16' / 'v5e-16', 'v6e-8' -> Accelerator; anything else is a UsageError."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text.strip())
    if not m:
        raise UsageError(f"unknown accelerator type {text!r}: expected v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N")
    family, size = m.group(1), int(m.group(2))
    generation = "v5e" if family in ("v5e", "v5litepod") else family
    if generation in MAX_CORES:
        if size < 8 or size % 8 or size > MAX_CORES[generation]:
            raise UsageError(f"accelerator type {text!r}: {generation} sizes count TensorCores, a multiple of 8 "
                             f"from 8 to {MAX_CORES[generation]}")
    elif size not in LITE_SIZES:
        raise UsageError(f"accelerator type {text!r}: {generation} slices have {', '.join(map(str, LITE_SIZES))} "
                         "chips")
    gcloud_type = f"v5litepod-{size}" if generation == "v5e" else f"{generation}-{size}"
    return Accelerator(generation, size, gcloud_type)


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------

# Compute Engine resource names (TPU VMs are Compute Engine VMs): RFC 1035, 1-63 characters.
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# Project IDs: 6-30 characters, lowercase letters, digits, hyphens, a letter first, no trailing hyphen
# (legacy domain-scoped IDs look like example.com:my-project).
PROJECT_RE = re.compile(r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")

SETTINGS = {  # setting -> environment / env-file variable
    "project": "TPU_PROJECT",
    "zone": "TPU_ZONE",
    "name": "TPU_NAME",
    "accelerator": "TPU_ACCELERATOR",
    "runtime_version": "TPU_RUNTIME_VERSION",
    "queued_resource": "TPU_QUEUED_RESOURCE",
    "remote_dir": "TPU_REMOTE_DIR",
}
DEFAULT_REMOTE_DIR = "eqvae-jax"  # on every worker, relative to the home directory
LOG_DIR = "eqvae-jax-logs"  # on every worker, relative to the home directory: JOB.log, JOB.pid


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (optional `export `, quotes, # comments), TPU_* keys of SETTINGS only."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read env file {path}: {e.strerror}") from None
    known = set(SETTINGS.values())
    out = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise UsageError(f"{path}:{number}: expected one of {', '.join(sorted(known))} as KEY=VALUE, "
                             f"got {raw.strip()!r}")
        words = shlex.split(value, comments=True)
        if len(words) > 1:
            raise UsageError(f"{path}:{number}: {key} has more than one word: {value.strip()!r}")
        out[key] = words[0] if words else ""
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    project: str
    zone: str
    name: str
    accelerator: Accelerator | None
    runtime_version: str
    queued_resource: str
    remote_dir: str

    def location(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


def resolve_settings(args: argparse.Namespace, required: Sequence[str]) -> Settings:
    """Flags > --env file > environment; every value given is validated, the `required` ones must be given."""
    from_file = read_env_file(args.env) if args.env else {}
    values = {}
    for key, var in SETTINGS.items():
        flag = getattr(args, key, None)
        values[key] = flag if flag not in (None, "") else from_file.get(var) or os.environ.get(var, "")
    missing = [f"--{k.replace('_', '-')} ({SETTINGS[k]})" for k in required if not values[k]]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: pass the flag, put it in the --env file or the environment")
    if "project" not in required:  # a local verb (precompile): no cloud resource is named
        accelerator = parse_accelerator(values["accelerator"])
        return Settings("", "", "", accelerator, values["runtime_version"] or accelerator.runtime_version, "", "")
    if not PROJECT_RE.fullmatch(values["project"]):
        raise UsageError(f"project {values['project']!r} is not a valid project ID (6-30 lowercase letters, digits "
                         "or hyphens, starting with a letter)")
    if not ZONE_RE.fullmatch(values["zone"]):
        raise UsageError(f"zone {values['zone']!r} is not a zone name like us-central2-b")
    qr = values["queued_resource"] or values["name"]
    for what, value in (("name", values["name"]), ("queued resource", qr)):
        if not NAME_RE.fullmatch(value):
            raise UsageError(f"TPU {what} {value!r} is not allowed: 1-63 characters, lowercase letters, digits and "
                             "hyphens, starting with a letter and not ending with a hyphen")
    accelerator = parse_accelerator(values["accelerator"]) if values["accelerator"] else None
    runtime = values["runtime_version"] or (accelerator.runtime_version if accelerator else "")
    remote_dir = values["remote_dir"] or DEFAULT_REMOTE_DIR
    if not re.fullmatch(r"[A-Za-z0-9._/~-]+", remote_dir):
        raise UsageError(f"remote dir {remote_dir!r}: use letters, digits and . _ / ~ - only")
    return Settings(values["project"], values["zone"], values["name"], accelerator, runtime, qr, remote_dir)


# --------------------------------------------------------------------------------------------------------
# gcloud
# --------------------------------------------------------------------------------------------------------


class Runner:
    """Runs gcloud commands, or prints them (--dry-run)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str], capture: bool = False) -> str:
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return ""
        try:
            done = subprocess.run(argv, check=False, text=True, stdout=subprocess.PIPE if capture else None)
        except FileNotFoundError:
            raise SystemExit("tpu.py: gcloud not found on PATH (install the Google Cloud CLI)") from None
        if done.returncode:
            raise SystemExit(f"tpu.py: command failed with exit status {done.returncode}: {shlex.join(argv)}")
        return done.stdout or ""


def queued_resources(s: Settings, verb: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, s.queued_resource, *s.location()]


def ssh(s: Settings, worker: str, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s.name, *s.location(), f"--worker={worker}",
            f"--command={command}"]


def remote(s: Settings, path: str = "") -> str:
    """A path on the workers (relative paths are under the home directory; ~ is left to the remote shell)."""
    base = s.remote_dir if s.remote_dir.startswith(("/", "~")) else f"~/{s.remote_dir}"
    return f"{base}/{path}" if path else base


# --------------------------------------------------------------------------------------------------------
# Verbs
# --------------------------------------------------------------------------------------------------------


def cmd_create(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    argv = queued_resources(s, "create") + [f"--node-id={s.name}", f"--accelerator-type={s.accelerator.gcloud_type}",
                                            f"--runtime-version={s.runtime_version}"]
    if args.spot:
        argv.append("--spot")
    elif args.reserved:
        argv.append("--reserved")
    run(argv)
    return 0


def cmd_wait(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    if args.timeout <= 0 or args.interval < 0:
        raise UsageError(f"wait: --timeout must be > 0 and --interval >= 0 (got {args.timeout:g}, {args.interval:g})")
    argv = queued_resources(s, "describe") + ["--format=value(state.state)"]
    if run.dry_run:
        run(argv)
        return 0
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        state = run(argv, capture=True).strip()
        if state != last:
            print(f"queued resource {s.queued_resource}: {state or '(no state)'}", flush=True)
            last = state
        if state == "ACTIVE":
            return 0
        if state in STATES_FAILED:
            print(f"tpu.py: queued resource {s.queued_resource} is {state}; see `gcloud compute tpus queued-resources "
                  f"describe {s.queued_resource} --zone={s.zone} --project={s.project}`", file=sys.stderr)
            return 1
        if time.monotonic() + args.interval > deadline:
            print(f"tpu.py: timed out after {args.timeout:g} s waiting for {s.queued_resource} (state {state})",
                  file=sys.stderr)
            return 1
        time.sleep(args.interval)


def tracked_files(root: str) -> list[str]:
    """The checkout's files as git sees them (tracked, plus untracked files that are not ignored)."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise UsageError(f"{root} is not a git checkout: use `setup --git URL` instead") from None
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names if os.path.isfile(os.path.join(root, n))]  # deleted-but-tracked files are skipped


def make_tarball(root: str, dst: str) -> int:
    files = tracked_files(root)
    with tarfile.open(dst, "w:gz") as tar:
        for name in files:
            tar.add(os.path.join(root, name), arcname=name, recursive=False)
    return len(files)


def cmd_setup(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    install = f"cd {remote(s)} && bash launch/setup.sh --tpu"
    if args.git:
        ref = shlex.quote(args.ref)
        fetch = (f"if [ -d {remote(s)}/.git ]; then git -C {remote(s)} fetch --quiet --tags origin; "
                 f"else git clone --quiet {shlex.quote(args.git)} {remote(s)}; fi && "
                 f"(git -C {remote(s)} checkout --quiet --detach origin/{ref} 2>/dev/null || "
                 f"git -C {remote(s)} checkout --quiet --detach {ref})")
        run(ssh(s, "all", f"set -e; {fetch} && {install}"))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tarball = "eqvae-jax.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, tarball)
        if not run.dry_run:
            count = make_tarball(root, local)
            print(f"copying {count} files of {root} to every worker of {s.name}", flush=True)
        run(["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{s.name}:{tarball}", *s.location(),
             "--worker=all"])
    unpack = f"mkdir -p {remote(s)} && tar -xzf ~/{tarball} -C {remote(s)} && rm ~/{tarball}"
    run(ssh(s, "all", f"set -e; {unpack} && {install}"))
    return 0


def job_paths(args: argparse.Namespace) -> tuple[str, str]:
    return f"~/{LOG_DIR}/{args.job}.log", f"~/{LOG_DIR}/{args.job}.pid"


def run_script(s: Settings, args: argparse.Namespace, command: Sequence[str]) -> str:
    """The shell script that starts `command` detached on a worker (same script on every worker).

    The job runs in its own session (setsid) under nohup with stdin closed, so it survives the ssh session and
    `stop` can signal its whole process group; output goes to ~/eqvae-jax-logs/JOB.log on the worker's disk.
    With --gcs-logs the log is copied to GCS_LOGS/JOB.worker-N.log every 60 s and once more at the end.
    """
    log, pid = job_paths(args)
    exports = "".join(f"export {shlex.quote(kv)}; " for kv in args.set_env)
    job = f"cd {remote(s)} && . .venv/bin/activate && {exports}exec {shlex.join(command)}"
    worker = ("export W=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/"
              "instance/attributes/agent-worker-number || hostname)")
    lines = [
        f"mkdir -p ~/{LOG_DIR}",
        f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then echo \"job {args.job} is already running "
        f"(pid $(cat {pid})): stop it first\" >&2; exit 1; fi",
        f"setsid nohup bash -c {shlex.quote(job)} > {log} 2>&1 < /dev/null & echo $! > {pid}",
    ]
    if args.gcs_logs:
        dst = f"{args.gcs_logs.rstrip('/')}/{args.job}.worker-$W.log"
        copy = f"gcloud storage cp --quiet {log} {dst} >/dev/null 2>&1"
        loop = f"while kill -0 $(cat {pid}) 2>/dev/null; do {copy}; sleep 60; done; {copy}"
        lines += [worker, f"setsid nohup bash -c {shlex.quote(loop)} > /dev/null 2>&1 < /dev/null &"]
    lines.append(f"echo \"$(hostname): started {args.job} (pid $(cat {pid})), log {log}\"")
    return "\n".join(lines)


def cmd_run(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run: give the command after --, e.g. run -- python -m eqvae_jax.main --config=...")
    for kv in args.set_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv):
            raise UsageError(f"--set-env {kv!r}: expected NAME=VALUE")
    if args.gcs_logs and not args.gcs_logs.startswith("gs://"):
        raise UsageError(f"--gcs-logs {args.gcs_logs!r}: expected a gs:// URL")
    run(ssh(s, "all", run_script(s, args, command)))
    return 0


def check_worker(s: Settings, worker: int) -> None:
    if worker < 0:
        raise UsageError(f"--worker {worker}: must be >= 0")
    if s.accelerator is not None and worker >= s.accelerator.workers:
        raise UsageError(f"--worker {worker}: {s.accelerator.gcloud_type} has {s.accelerator.workers} worker(s), "
                         f"0..{s.accelerator.workers - 1}")


def cmd_logs(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    check_worker(s, args.worker)
    if args.lines < 0:
        raise UsageError(f"--lines {args.lines}: must be >= 0")
    log, _ = job_paths(args)
    follow = "-F " if args.follow else ""
    run(ssh(s, str(args.worker), f"tail {follow}-n {args.lines} {log}"))
    return 0


def cmd_status(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    run(queued_resources(s, "describe") + ["--format=value(state.state)"])
    log, pid = job_paths(args)
    probe = (f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then echo \"$(hostname): {args.job} running "
             f"(pid $(cat {pid}))\"; else echo \"$(hostname): {args.job} not running\"; fi; "
             f"[ -f {log} ] && tail -n {args.lines} {log} || true")
    run(ssh(s, "all", probe))
    return 0


def cmd_stop(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    _, pid = job_paths(args)
    sig = "KILL" if args.kill else "TERM"
    stop = (f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then kill -{sig} -- -$(cat {pid}) && "
            f"echo \"$(hostname): sent SIG{sig} to {args.job}\"; else echo \"$(hostname): {args.job} not running\"; fi")
    run(ssh(s, "all", stop))
    return 0


def cmd_delete(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    run(queued_resources(s, "delete") + ["--force", "--quiet"])  # --force deletes the TPU VMs too
    return 0


# What eqvae_jax.parallel.aot.prepare_environment sets (this file must not import eqvae_jax): JAX on the local
# CPU, no metadata server, libtpu's compile-only client beside any other, and LIBTPU_INIT_ARGS as `import jax`
# makes it on a TPU VM (the flags are part of JAX's compilation cache key).
TOPOLOGY_ENV = "EQVAE_COMPILE_ONLY_TOPOLOGY"
TPU_VM_LIBTPU_ARGS = "--xla_tpu_use_enhanced_launch_barrier=true"


def precompile_env(s: Settings, libtpu: str) -> dict[str, str]:
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    env = {TOPOLOGY_ENV: s.accelerator.gcloud_type, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "LIBTPU_INIT_ARGS": args if TPU_VM_LIBTPU_ARGS in args else f"{args} {TPU_VM_LIBTPU_ARGS}".strip(),
           "PYTHONPATH": os.pathsep.join(p for p in (libtpu, os.environ.get("PYTHONPATH", "")) if p)}
    return env


def cmd_precompile(s: Settings, args: argparse.Namespace, run: Runner) -> int:
    """Run the job's command here (no TPU) in compile-only mode for the slice's topology.

    The job sees EQVAE_COMPILE_ONLY_TOPOLOGY, compiles every program for that topology into its persistent
    compilation cache (config.compilation_cache_dir, default WORKDIR/jax_cache: give the same gs:// workdir as
    the real run, the directory string is part of the cache key) and exits; the slice then starts compiled.
    """
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("precompile: give the job's command after --, e.g. precompile -- python -m eqvae_jax.main "
                         "--config=configs/sdvae_ft.py --workdir=gs://BUCKET/run")
    if not os.path.isdir(os.path.join(args.libtpu, "libtpu")):
        raise UsageError(f"--libtpu {args.libtpu}: no libtpu package there (pip install --no-deps --target "
                         f"{args.libtpu} -r requirements-tpu-aot.txt)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = precompile_env(s, args.libtpu)
    if run.dry_run:
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + command), flush=True)
        return 0
    return subprocess.run(command, cwd=root, env={**os.environ, **env}, check=False).returncode


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", help="settings file of TPU_*=VALUE lines (see launch/tpu.env.example)")
    p.add_argument("--project", help="Google Cloud project ID [TPU_PROJECT]")
    p.add_argument("--zone", help="zone, e.g. us-east5-a [TPU_ZONE]")
    p.add_argument("--name", help="TPU VM (node) name [TPU_NAME]")
    p.add_argument("--accelerator", help="v4-N, v5p-N, v5litepod-N (v5e-N), v6e-N [TPU_ACCELERATOR]")
    p.add_argument("--runtime-version", help="override the runtime chosen from the accelerator [TPU_RUNTIME_VERSION]")
    p.add_argument("--queued-resource", help="queued resource ID (default: the name) [TPU_QUEUED_RESOURCE]")
    p.add_argument("--remote-dir", help=f"project dir on the workers (default ~/{DEFAULT_REMOTE_DIR}) [TPU_REMOTE_DIR]")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    v = verbs.add_parser("create", help="request the slice as a queued resource")
    kind = v.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper)")
    kind.add_argument("--reserved", action="store_true", help="use the project's reservation")
    v = verbs.add_parser("wait", help="poll the queued resource until ACTIVE (exit 1 on FAILED/SUSPENDED/timeout)")
    v.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    v.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    v = verbs.add_parser("setup", help="copy this checkout (or clone --git) to every worker and install")
    v.add_argument("--git", help="clone this URL on the workers instead of copying the local checkout")
    v.add_argument("--ref", default="main", help="branch, tag or commit to check out with --git (default main)")
    for name, help_text in (("run", "start a command detached on every worker"), ("logs", "show a worker's log"),
                            ("status", "queued resource state and the job on every worker"),
                            ("stop", "SIGTERM the job on every worker (it saves a checkpoint and exits)")):
        v = verbs.add_parser(name, help=help_text)
        v.add_argument("--job", default="train", help="job name: log and pid file names (default train)")
        if name == "run":
            v.add_argument("--gcs-logs", help="also copy each worker's log to this gs:// directory (every 60 s)")
            v.add_argument("--set-env", action="append", default=[], metavar="NAME=VALUE",
                           help="environment variable for the job (repeatable)")
            v.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, run in the project dir")
        if name == "logs":
            v.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
            v.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
        if name in ("logs", "status"):
            v.add_argument("--lines", "-n", type=int, default=100 if name == "logs" else 3, help="lines of the log")
        if name == "stop":
            v.add_argument("--kill", action="store_true", help="SIGKILL instead (no checkpoint)")
    verbs.add_parser("delete", help="delete the queued resource and its TPU VMs")
    v = verbs.add_parser("precompile", help="here, without a TPU: compile the job's programs for the slice's "
                                            "topology into its persistent compilation cache")
    v.add_argument("--libtpu", default=os.environ.get("LIBTPU_AOT_PATH", "/opt/libtpu_aot"),
                   help="directory holding the libtpu package (default $LIBTPU_AOT_PATH or /opt/libtpu_aot)")
    v.add_argument("command", nargs=argparse.REMAINDER, help="-- then the job's command, as for run")
    return p


VERBS = {"create": cmd_create, "wait": cmd_wait, "setup": cmd_setup, "run": cmd_run, "logs": cmd_logs,
         "status": cmd_status, "stop": cmd_stop, "delete": cmd_delete, "precompile": cmd_precompile}
REQUIRED = {"create": ("project", "zone", "name", "accelerator"), "precompile": ("accelerator",)}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        settings = resolve_settings(args, REQUIRED.get(args.verb, ("project", "zone", "name")))
        return VERBS[args.verb](settings, args, Runner(args.dry_run))
    except UsageError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
