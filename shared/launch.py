"""Launch a pending job exactly once per attempt, and stop the runs the queue no longer wants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from google.auth.exceptions import GoogleAuthError

from shared.jobs import JobStatus
from shared.jobstore import JobStore
from shared.launchers import Launcher, LaunchError, LaunchRefused


def launch_pending_job(store: JobStore, launcher: Launcher, job_id: str, now: datetime) -> str:
    """Claim the job (pending -> scheduled, in a transaction), then start its worker.

    A duplicate event loses the claim and launches nothing. If the launcher fails,
    the attempt is retried or the job failed, per its attempt limit; if it refuses
    (the job can never run there), the job fails at once with the refusal as its error.
    """
    job = store.claim(job_id, now)
    if job is None:
        return "not pending (already claimed, or gone): nothing to launch"
    try:
        execution = launcher.launch(job)
    except LaunchRefused as exc:
        after = store.refuse(job.id, job.attempt, now, str(exc))
        return f"attempt {job.attempt} refused ({exc}); job now {after.status if after else 'unchanged'}"
    except (LaunchError, GoogleAuthError) as exc:  # an engine's client without credentials: this attempt failed to launch
        after = store.fail_launch(job.id, job.attempt, now, f"launch failed: {exc}")
        return f"launch of attempt {job.attempt} failed ({exc}); job now {after.status if after else 'unchanged'}"
    if store.set_execution(job.id, job.attempt, execution) is None:
        # Cancelled (or gone) while it launched: the job document will never name this run, so nothing else can stop it.
        stopped = stop_run(launcher, execution)
        return f"attempt {job.attempt} launched as {execution}, but the job moved on meanwhile: {stopped}"
    return f"attempt {job.attempt} launched: {execution}"


@dataclass(frozen=True)
class Stopped:
    """What came of stopping one run: stopped (or over already), failed (worth another try), or unsupported."""

    execution: str
    outcome: Literal["stopped", "failed", "unsupported"]
    detail: str = ""

    def __str__(self) -> str:
        return f"stopped {self.execution}" if self.outcome == "stopped" else f"could not stop {self.execution}: {self.detail}"


def stop_run(launcher: Launcher, execution: str) -> Stopped:
    """Ask the launcher to stop a run; a launcher without `stop`, or one that fails, is reported, not raised."""
    stop = getattr(launcher, "stop", None)
    if stop is None:
        return Stopped(execution, "unsupported", f"{type(launcher).__name__} cannot stop runs")
    try:
        stop(execution)
    except (LaunchError, ValueError, OSError, GoogleAuthError) as exc:
        return Stopped(execution, "failed", str(exc))
    return Stopped(execution, "stopped")


def cancelled_execution(before: dict | None, after: dict | None) -> str | None:
    """The run to stop when this write cancelled a job (its fields before and after): the job's execution, if any."""
    if after is None or after.get("status") != JobStatus.CANCELLED or (before or {}).get("status") == JobStatus.CANCELLED:
        return None
    return after.get("execution") or None
