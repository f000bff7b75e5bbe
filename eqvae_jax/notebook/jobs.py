"""Run a training job from a notebook: `python -m eqvae_jax.main` in a subprocess, its metrics redrawn live.

    command = job_command("configs/demo.py", "workdirs/demo", {"total_updates": 300})
    run_job(command, "workdirs/demo", on_update=lambda rows, log: ...)   # rows: WORKDIR/metrics.jsonl so far

The job is exactly the command-line job (checkpoints, resume, evaluation, the diffusers export at the end); the
notebook only watches WORKDIR/metrics.jsonl and the job's log. Interrupting the cell sends the job SIGTERM,
which saves a checkpoint; running the cell again resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from eqvae_jax.notebook.errors import JobFailed
from eqvae_jax.notebook.runtime import repo_path

LOG_FILE = "notebook_job.log"


def job_command(config: str, workdir: str, overrides: Mapping[str, Any] = {}) -> list[str]:  # noqa: B006
    """The job's command line: a config of the checkout (`configs/X.py[:variant]`) and `--config.KEY=VALUE`s."""
    path, sep, variant = config.partition(":")
    args = [sys.executable, "-m", "eqvae_jax.main", f"--config={repo_path(path)}{sep}{variant}",
            f"--workdir={workdir}"]
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = str(value).lower()
        args.append(f"--config.{key}={value}")
    return args


def log_tail(path: str, lines: int = 8) -> str:
    """The last `lines` lines of a text file ('' if it does not exist yet)."""
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 16384))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def run_job(command: list[str], workdir: str,
            on_update: Callable[[list[dict[str, Any]], str], None] | None = None,
            refresh_s: float = 5.0, tail_lines: int = 8) -> str:
    """Run `command` until it exits, calling `on_update(metrics rows, log tail)` whenever either grew; returns
    the log path (WORKDIR/notebook_job.log). A non-zero exit raises JobFailed with the log's last lines."""
    # Should the job import TensorFlow (TFDS may, preparing some datasets): quietly.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from eqvae_jax.train.metrics_file import read_metrics

    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, LOG_FILE)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    seen = (-1, -1)
    try:
        while True:
            code = proc.poll()
            rows = read_metrics(workdir)
            now = (len(rows), os.path.getsize(log_path))
            if on_update is not None and (now != seen or code is not None):
                on_update(rows, log_tail(log_path, tail_lines))
                seen = now
            if code is not None:
                break
            time.sleep(refresh_s)
    except BaseException:  # KeyboardInterrupt (the notebook's stop button) or a failing callback
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the job checkpoints and exits; running again resumes
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    if code != 0:
        raise JobFailed(failure_message(code, log_tail(log_path, 20), log_path))
    return log_path


def failure_message(code: int, tail: str, log_path: str) -> str:
    """The job's own `error: ...` report (what eqvae_jax.main prints for bad config or weights) if its log ends
    with one, else the log's last lines."""
    lines = tail.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        report = "\n".join(lines[starts[-1]:]).removeprefix("error: ").rstrip()
        return f"the job stopped (exit status {code}): {report}"
    return f"the job exited with status {code}; the last lines of {log_path}:\n{tail}"

