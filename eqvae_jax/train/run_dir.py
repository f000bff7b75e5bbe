"""The services of one run in its workdir: layout, persistent compilation cache, metric writer, checkpoints,
stop requests. Workdirs may be local or on GCS (gs://...)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
from etils import epath

from eqvae_jax import storage
from eqvae_jax.train import metrics
from eqvae_jax.train.checkpointing import Checkpointer, CheckpointOptions
from eqvae_jax.train.config import RunConfig
from eqvae_jax.train.preemption import StopRequest
from eqvae_jax.typed_config import to_json_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunServices:
    workdir: str
    writer: metrics.MetricWriter
    checkpointer: Checkpointer
    stop: StopRequest

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.flush()
        self.writer.close()
        self.stop.restore_handlers()


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA cache so a restarted run does not pay the compile time of every variant again.

    Not for a multi-process job on CPUs: there the key includes a per-process CPU topology fingerprint, so
    process 0 finds its own entries while the others (which never write) compile again; a process that
    reaches a cross-process collective more than 30 s before another fails gloo's context rendezvous
    (DEADLINE_EXCEEDED) or desynchronises. TPU processes compute one key and all hit or miss together.
    """
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        log.warning("compilation cache off: a multi-process CPU job has per-process cache keys")
        return
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def write_config(workdir: str, config: Any) -> None:
    """WORKDIR/config.json (process 0): the run's full config, for humans and for the CLIs that read a run."""
    if jax.process_index() == 0:
        text = json.dumps(to_json_dict(config), indent=2, default=str)
        storage.write_atomic(os.path.join(workdir, "config.json"), text.encode())  # local or gs://


def open_run(config: RunConfig, workdir: str) -> RunServices:
    """Create the workdir layout and the services of a run (call after the config was parsed). config.json is
    written by the loop once the resume check passed (train/loop.py), so a rejected resume changes nothing."""
    workdir = storage.resolve(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(config.compilation_cache_dir or os.path.join(workdir, "jax_cache"))
    c = config.checkpoint
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        CheckpointOptions(every_steps=c.every_updates, max_to_keep=c.max_to_keep,
                          keep_every=c.keep_every or None, async_save=c.async_save),
    )
    return RunServices(workdir, metrics.create_writer(workdir), checkpointer,
                       StopRequest(sync_every=config.log.every_updates))
