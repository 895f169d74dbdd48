"""What must happen on a clock, not on an event: reap silent workers, close rounds past their deadline.

Production runs `tick` from Cloud Scheduler through the `on_tick` function every
minute; the local stack runs it every `reaper_interval_s`.
"""

from __future__ import annotations

from datetime import datetime

from shared.hub import SweepOutcome, sweep_deadlines
from shared.ingest import Services
from shared.jobs import Job
from shared.jobstore import JobStore


def tick(svc: Services, now: datetime) -> tuple[list[tuple[Job, int]], list[SweepOutcome]]:
    """Returns the reaped jobs (as written, and the attempt that was lost) and the round outcomes."""
    try:
        reaped = JobStore(svc.db, svc.settings).reap(now)
    finally:  # rounds close on time even when reaping jobs failed (its error still propagates)
        rounds = sweep_deadlines(svc, now)
    return reaped, rounds
