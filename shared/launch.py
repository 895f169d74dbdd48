"""Launch a pending job exactly once per attempt."""

from __future__ import annotations

from datetime import datetime

from shared.jobstore import JobStore
from shared.launchers import Launcher, LaunchError


def launch_pending_job(store: JobStore, launcher: Launcher, job_id: str, now: datetime) -> str:
    """Claim the job (pending -> scheduled, in a transaction), then start its worker.

    A duplicate event loses the claim and launches nothing. If the launcher fails,
    the attempt is retried or the job failed, per its attempt limit.
    """
    job = store.claim(job_id, now)
    if job is None:
        return "not pending (already claimed, or gone): nothing to launch"
    try:
        execution = launcher.launch(job)
    except LaunchError as exc:
        after = store.fail_launch(job.id, job.attempt, now, f"launch failed: {exc}")
        return f"launch of attempt {job.attempt} failed ({exc}); job now {after.status if after else 'unchanged'}"
    store.set_execution(job.id, job.attempt, execution)
    return f"attempt {job.attempt} launched: {execution}"
