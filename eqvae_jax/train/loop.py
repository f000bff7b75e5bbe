"""The training loop every job shares.

A job builds its pieces into a `Job` (state, a micro-step function, a checkpointable data iterator, optional
host state, evaluation and logging hooks; what only some jobs have in `Extras`) and calls
`run(job, config, services)`. The loop does everything else, the same way for every job:

  resume   from the newest checkpoint in the workdir that restores (state onto its current shardings, the data
           iterator, the job's host state such as RNG; a damaged step is moved aside as `<step>.damaged`),
           after checking that the saved config agrees on the keys the job names in `resume_must_match`;
           only then WORKDIR/config.json is written; then `extras.on_start` (e.g. start compiling ahead);
  step     `extras.micro_steps_per_update` micro-steps per optimizer update; progress counts updates;
  log      every `log.every_updates`: fetch the buffered metrics once, apply the non-finite policy
           (train/guard.py), write TensorBoard scalars and one console line (metrics, steps/s, ETA; the
           first update of a call, which compiles, is left out of the line's rate and ETA); scalar
           metrics are averaged over the interval's micro-steps, array metrics summed and handed to
           `extras.interval_scalars` (e.g. code counts -> codebook usage);
  eval     at update 0 of a fresh run, every `job.eval_every` updates, at `extras.milestones`, and at the end;
  save     every `checkpoint.every_updates`, at `extras.milestones`, on a stop request and at the end; never
           state that failed the non-finite check;
  profile  the run config's `profile` window into WORKDIR/profile (train/profiling.py); every update is a
           `StepTraceAnnotation("train")`, data loading and evaluation are annotated too;
  stop     on SIGTERM (TPU preemption) or after `stop_after` updates of this call: save and return;
  finish   after the last update: `extras.finish` (exports), then a summary table of evaluations and outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

from eqvae_jax.train import console
from eqvae_jax.train.config import RunConfig
from eqvae_jax.train.errors import ResumeError  # noqa: F401  (re-exported: loop.ResumeError)
from eqvae_jax.train.guard import NonFiniteCounter
from eqvae_jax.train.metrics import MetricBuffer, mean_of, sum_of
from eqvae_jax.train.profiling import Profiler
from eqvae_jax.train.run_dir import RunServices, write_config
from eqvae_jax.typed_config import dotted, to_json_dict

log = logging.getLogger(__name__)

Metrics = Mapping[str, jax.Array]


class HostState(Protocol):
    """Host-side state checkpointed beside the device state, as one JSON object (e.g. an RNG's state)."""

    def state(self) -> dict[str, Any]:
        """The JSON-serialisable state to save (keys 'update' and 'nonfinite_total' are the loop's)."""
        ...

    def set_state(self, saved: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's whole host JSON (the keys `state()` wrote, and the loop's)."""
        ...


@dataclasses.dataclass(frozen=True)
class FixedHostState:
    """Host state that never changes, saved for the readers of a checkpoint (e.g. a cache's meta); not restored."""

    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return dict(self.values)

    def set_state(self, saved: Mapping[str, Any]) -> None:
        del saved


@dataclasses.dataclass(frozen=True)
class NamedHostState:
    """The state of one object with `state()` / `set_state()` (e.g. a sampler), saved under the key `name`."""

    name: str
    target: Any

    def state(self) -> dict[str, Any]:
        return {self.name: self.target.state()}

    def set_state(self, saved: Mapping[str, Any]) -> None:
        self.target.set_state(saved[self.name])


@dataclasses.dataclass(frozen=True)
class Extras:
    """What only some jobs have (the EQ-VAE job: accumulation, the end of pre-training, compiling ahead, exports)."""

    micro_steps_per_update: int = 1
    milestones: tuple[int, ...] = ()  # further updates at which to evaluate and checkpoint
    # array metrics of a step (e.g. code counts) summed over the log interval -> scalars for the log line
    interval_scalars: Callable[[dict[str, Any]], dict[str, float]] | None = None
    on_start: Callable[[int], None] | None = None  # after resuming, before any step: (first micro-step to run)
    finish: Callable[[Any], dict[str, str]] | None = None  # after the last update: {output name: path}


@dataclasses.dataclass
class Job:
    """What a job hands the loop. Only `name`, `state`, `train_step` and `data` are required."""

    name: str
    state: Any  # device pytree; checkpointed; replaced by every micro-step
    train_step: Callable[[Any, Mapping[str, jax.Array], int], tuple[Any, Metrics]]  # (state, batch, micro_step)
    data: Any  # iterator of batches with the Grain checkpoint protocol (get_state / set_state)
    host: HostState = FixedHostState()  # checkpointed with the state
    resume_must_match: tuple[str, ...] = ()  # dotted config keys a resumed run must not change
    evaluate: Callable[[Any, int, Any], dict[str, float]] | None = None  # (state, update, writer) -> scalars
    eval_every: int = 0  # updates between evaluations (0: start and end only)
    log_scalars: Callable[[dict[str, float]], dict[str, float]] | None = None  # extras per log line, given it
    # (label, metric) pairs on the progress line, or a function of the interval's scalars giving them (e.g. to
    # leave out the columns of loss terms that are switched off)
    console_fields: tuple[tuple[str, str], ...] | Callable[[Mapping[str, float]], tuple[tuple[str, str], ...]] = ()
    summary_metrics: tuple[str, ...] = ()  # eval metrics in the end-of-run table
    overview: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # {name: pytree} for the start-up table
    extras: Extras = Extras()


def _check_resume(saved: Mapping[str, Any] | None, config: Any, keys: tuple[str, ...]) -> None:
    if not saved:
        return
    now = to_json_dict(config)
    changed = [(k, dotted(saved, k), dotted(now, k)) for k in keys if dotted(saved, k) != dotted(now, k)]
    if changed:
        detail = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in changed)
        raise ResumeError(f"resuming with a different config ({detail}); use a new --workdir or the saved config")


def _restore(job: Job, config: Any, services: RunServices, counter: NonFiniteCounter) -> int:
    """Resume from the newest checkpoint that restores (damaged ones are moved aside, train/checkpointing.py)."""
    restored = services.checkpointer.restore_newest(
        job.state, job.data, check=lambda saved: _check_resume(saved, config, job.resume_must_match))
    if restored is None:
        return 0
    job.state = restored.state
    job.host.set_state(restored.host)
    counter.total = int(restored.host.get("nonfinite_total", 0))
    log.info("%s: resumed at update %d from %s", job.name, restored.step, services.checkpointer.directory)
    return restored.step


def _evaluate(job: Job, update: int, services: RunServices, summary: dict[str, Any]) -> None:
    if job.evaluate is None:
        return
    with jax.profiler.TraceAnnotation("eval"):
        results = job.evaluate(job.state, update, services.writer)
    if not results:
        return
    services.writer.write_scalars(update, results)
    summary["evals"][update] = results
    shown = [k for k in job.summary_metrics if k in results] or sorted(results)
    log.info("eval at update %d: %s", update,
             "  ".join(f"{k.removeprefix('eval/')} {console.number(results[k])}" for k in shown))


def _summary_table(job: Job, summary: dict[str, Any], services: RunServices) -> str:
    lines = [console.table([("TensorBoard", f"{services.workdir}/tensorboard"),
                            ("checkpoints", f"{services.workdir}/checkpoints"),
                            *summary.get("outputs", {}).items()])]
    evals = summary["evals"]
    keys = [k for k in job.summary_metrics if any(k in r for r in evals.values())]
    if evals and keys:
        rows = [(f"update {u}", *(console.number(r[k]) if k in r else "" for k in keys))
                for u, r in sorted(evals.items())]
        lines.append(console.table(rows, ("eval", *(k.removeprefix("eval/") for k in keys))))
    return "\n\n".join(lines)


def run(job: Job, config: RunConfig, services: RunServices, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) to config.total_updates; returns a summary (see the module docstring).

    summary: start_update, updates (the last one reached), stopped (if a stop request ended the call),
    evals ({update: scalars}), last_metrics, outputs ({name: path} from `extras.finish`), state.
    `stop_after=N` ends the call like a SIGTERM would (checkpoint, then return) after N updates.
    """
    extras = job.extras
    total, k = config.total_updates, extras.micro_steps_per_update
    counter = NonFiniteCounter(config.max_consecutive_nonfinite)
    start = _restore(job, config, services, counter)
    write_config(services.workdir, config)  # only now: a rejected resume leaves the workdir's config.json as it was
    summary: dict[str, Any] = {"start_update": start, "updates": start, "evals": {}, "outputs": {}, "state": job.state}
    if start >= total:
        log.info("%s: already trained to update %d in %s; nothing to do", job.name, start, services.workdir)
        return summary
    if extras.on_start is not None:
        extras.on_start(start * k)
    if job.overview and jax.process_index() == 0:
        log.info("%s: networks and state\n%s", job.name, console.parameter_table(job.overview))
    if start == 0:
        _evaluate(job, 0, services, summary)
    buffer = MetricBuffer()
    last_time, last_update = time.perf_counter(), start
    profiler = Profiler(config.profile, services.workdir)

    def flush(update: int) -> dict[str, float]:
        steps = buffer.fetch()
        for m in steps:
            counter.update(m.get("nonfinite", 0.0))
        counter.check(update)
        scalars = mean_of(steps)
        if extras.interval_scalars is not None:
            scalars.update(extras.interval_scalars(sum_of(steps)))
        return scalars

    def save(update: int) -> None:
        host = {**job.host.state(), "update": update, "nonfinite_total": counter.total}
        services.checkpointer.save(update, job.state, host, to_json_dict(config), job.data)

    def step(update: int) -> None:
        profiler.before(update)
        with jax.profiler.StepTraceAnnotation("train", step_num=update):
            for micro in range((update - 1) * k, update * k):
                with jax.profiler.TraceAnnotation("data"):
                    batch = next(job.data)
                job.state, metrics = job.train_step(job.state, batch, micro)
                buffer.add(metrics)
        profiler.after(update, job.state)

    try:
        for update in range(start + 1, total + 1):
            step(update)
            if update == start + 1:  # it compiled the programs: left out of the console's rate and ETA
                compiled_s = time.perf_counter() - last_time
                eta_time, eta_update = time.perf_counter(), update
            if stop_after is not None and update - start >= stop_after:
                services.stop.request()
            stop = services.stop.should_stop(update)
            saving = (update in extras.milestones or update == total or stop
                      or services.checkpointer.should_save(update))
            if update % config.log.every_updates == 0 or saving:
                scalars = flush(update)
                now = time.perf_counter()
                rate = (update - last_update) / max(now - last_time, 1e-9)
                last_time, last_update = now, update
                scalars["perf/updates_per_s"] = rate
                if job.log_scalars is not None:
                    scalars.update(job.log_scalars(scalars))
                services.writer.write_scalars(update, scalars)
                summary["last_metrics"] = scalars
                fields = job.console_fields(scalars) if callable(job.console_fields) else job.console_fields
                run_rate = (update - eta_update) / max(now - eta_time, 1e-9) if update > eta_update else None
                eta_time, eta_update = now, update
                log.info(console.progress_line(update, total, scalars, fields, run_rate,
                                               (total - update) / run_rate if run_rate else None,
                                               None if run_rate else f"compiling: first update took "
                                                                     f"{console.duration(compiled_s)}"))
            evaluate = update in extras.milestones or (job.eval_every and update % job.eval_every == 0)
            if evaluate and update != total:
                _evaluate(job, update, services, summary)
            if saving and update not in services.checkpointer.all_steps():
                save(update)
            summary["updates"] = update
            if stop:
                log.warning("%s: stopped at update %d (checkpoint saved)", job.name, update)
                summary["stopped"] = update
                summary["state"] = job.state
                return summary
    finally:
        profiler.stop()
    _evaluate(job, total, services, summary)
    if extras.finish is not None:
        summary["outputs"] = extras.finish(job.state)
    summary["state"] = job.state
    if jax.process_index() == 0:
        log.info("%s: done\n%s", job.name, _summary_table(job, summary, services))
    return summary
