"""What must happen on a clock, not on an event: follow runs on their engines, reap silent
workers, stop the runs the queue gave up on, close rounds past their deadline.

Production runs `tick` from Cloud Scheduler through the `on_tick` function every
minute; the local stack runs it every `reaper_interval_s`.

Following runs: for the scheduled and running jobs that have an execution (the
longest-silent first, at most MAX_POLLS a tick: each is one call to an engine), the
launcher's `state` decides:

- FAILED, CANCELLED or GONE while the job is not terminal: the worker can no longer
  report, so the attempt is lost now (retried or failed), without waiting for its lease;
- QUEUED while the job is scheduled: the engine waits for capacity (a TPU slice, a
  flex-start GPU), so the attempt's lease is renewed, up to MAX_QUEUED since its claim;
- anything else (running, succeeded, ended, or a state that cannot be read): the lease
  decides, as it always did; a worker that finished reports its own result.

The runs of attempts reaped for silence are stopped: a hung worker must not write late.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from google.auth.exceptions import GoogleAuthError

from shared.hub import SweepOutcome, sweep_deadlines
from shared.ingest import Services
from shared.jobs import Job, JobStatus, is_lease_expired, last_sign
from shared.jobstore import JobStore
from shared.launch import Stopped, stop_run
from shared.launchers import Launcher, LaunchError, RunState

log = logging.getLogger("fedpipe.timekeeper")

MAX_POLLS = 50  # engine state reads per tick
LOST = frozenset({RunState.FAILED, RunState.CANCELLED, RunState.GONE})


@dataclass(frozen=True)
class Polled:
    """One run's state as its engine gave it (None: unknown), and what the queue did about it."""

    job_id: str
    attempt: int
    execution: str
    state: RunState | None
    action: Literal["lost", "waiting", "none"]
    detail: str = ""  # the reason an attempt was lost, or why the state is unknown


@dataclass(frozen=True)
class Reaped:
    job: Job  # as written
    attempt: int  # the attempt that was lost
    execution: str | None  # its run


@dataclass(frozen=True)
class Followed:
    polled: list[Polled]
    reaped: list[Reaped]
    stopped: list[Stopped]


def read_state(launcher: Launcher, execution: str) -> tuple[RunState | None, str]:
    """(state, "") or (None, why it is unknown): a launcher without `state`, or one that fails, must not stop the clock."""
    state = getattr(launcher, "state", None)
    if state is None:
        return None, f"{type(launcher).__name__} cannot read run states"
    try:
        return RunState(state(execution)), ""
    except (LaunchError, ValueError, OSError, GoogleAuthError) as exc:  # no credentials must not stop the clock either
        return None, str(exc)


def poll(store: JobStore, launcher: Launcher, job: Job, now: datetime) -> Polled:
    """Ask the engine about `job`'s run (it has an execution) and act on the answer."""
    execution = job.execution or ""
    state, why = read_state(launcher, execution)
    if state in LOST:
        reason = f"the engine reports its run {state} ({execution})"
        written = store.lose(job, now, reason)
        return Polled(job.id, job.attempt, execution, state, "lost" if written else "none", reason)
    if state is RunState.QUEUED and job.status is JobStatus.SCHEDULED and store.renew_queued(job, now) is not None:
        return Polled(job.id, job.attempt, execution, state, "waiting")
    return Polled(job.id, job.attempt, execution, state, "none", why)


def follow(store: JobStore, launcher: Launcher | None, now: datetime, max_polls: int = MAX_POLLS) -> Followed:
    """Poll the longest-silent runs, then reap the silent, then stop what was reaped (without a launcher: reap only)."""
    jobs = store.active()
    watched = sorted((j for j in jobs if j.execution), key=last_sign)[:max_polls] if launcher is not None else []
    polled = [poll(store, launcher, job, now) for job in watched]
    moved = {p.job_id for p in polled if p.action != "none"}  # lost or renewed just now: nothing left to reap
    reaped = []
    for job in (j for j in jobs if j.id not in moved and is_lease_expired(j, now)):
        written = store.reap(job, now)  # None when polling just moved it, renewed it, or its worker spoke
        if written is not None:
            reaped.append(Reaped(written, job.attempt, job.execution))
    stopped = [stop_run(launcher, r.execution) for r in reaped if r.execution] if launcher is not None else []
    return Followed(polled, reaped, stopped)


def _log(followed: Followed) -> None:
    for p in followed.polled:
        if p.action == "lost":
            log.warning("job %s attempt %d lost: %s", p.job_id, p.attempt, p.detail)
        elif p.state is None:
            log.info("job %s attempt %d: state of %s unknown: %s", p.job_id, p.attempt, p.execution, p.detail)
    for s in followed.stopped:
        log.log(logging.INFO if s.outcome == "stopped" else logging.WARNING, "reaped run: %s", s)


def _launcher_from_env() -> Launcher | None:
    from shared.launchers.select import launcher_from_env

    try:
        return launcher_from_env()
    except (ValueError, ImportError) as exc:  # a deployment without a launcher's settings still reaps by lease
        log.error("no launcher to follow runs with (%s): reaping by lease only", exc)
        return None


def tick(svc: Services, now: datetime, launcher: Launcher | None = None) -> tuple[list[tuple[Job, int]], list[SweepOutcome]]:
    """Returns the jobs reaped for silence (as written, and the attempt that was lost) and the round outcomes.

    `launcher` defaults to the one FEDPIPE_LAUNCHER names (the one that launched the runs).
    """
    try:
        followed = follow(JobStore(svc.db, svc.settings), launcher or _launcher_from_env(), now)
        _log(followed)
    finally:  # rounds close on time even when following jobs failed (its error still propagates)
        rounds = sweep_deadlines(svc, now)
    return [(r.job, r.attempt) for r in followed.reaped], rounds

