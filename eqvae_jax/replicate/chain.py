"""`replicate(config, workdir)`: check every stage's config, then run the unfinished stages (the CLI's body)."""

from __future__ import annotations

import os
from typing import Any

from ml_collections import ConfigDict

from eqvae_jax.replicate import jobs, stages, vq_jobs
from eqvae_jax.replicate.config import ReplicateConfig, own_problems
from eqvae_jax.replicate.runner import run_stages
from eqvae_jax.typed_config import ConfigError, parse_collect


def check(config: ConfigDict | ReplicateConfig, root: str) -> ReplicateConfig:
    """The typed config, or one ConfigError with every problem: the chain's own and those of every stage's
    derived job config (named by stage)."""
    c, problems = (config, []) if isinstance(config, ReplicateConfig) else parse_collect(ReplicateConfig, config)
    problems += own_problems(c)
    if c.kl:
        try:
            jobs.check_all(c, root)
        except ConfigError as e:
            problems += e.problems
    if c.vq:
        problems += vq_jobs.problems(c, root, jobs.paths(root)["cache"])
    if problems:
        raise ConfigError(problems)
    return c


def replicate(config: ConfigDict | ReplicateConfig, workdir: str) -> dict[str, Any]:
    """Run (or resume) the chain in `workdir`; returns the stage record. A ConfigError comes before any work."""
    root = os.path.abspath(workdir)
    c = check(config, root)
    os.makedirs(root, exist_ok=True)
    return run_stages(stages.build(c, root), root, stages.DEFAULT_RATES)
