"""The local stack's clock: runs shared.timekeeper.tick (what the on_tick function runs from
Cloud Scheduler in production) and kills the local process of a reaped attempt."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from google.cloud import firestore, pubsub_v1, storage
from pydantic import ValidationError

from emulators.launcher import worker_pid_file
from emulators.processes import kill_group
from shared.config import Settings
from shared.ingest import Services
from shared.jobs import utcnow
from shared.timekeeper import tick

log = logging.getLogger("fedpipe.reaper")


def run_reaper(settings: Settings, interval_s: float, state_dir: Path, stop: threading.Event) -> None:
    """The local clock: `tick` every interval, and make sure a reaped local worker is dead."""
    db = firestore.Client(project=settings.project)
    svc = Services(settings, db, storage.Client(project=settings.project), pubsub_v1.PublisherClient())
    while not stop.wait(interval_s):
        try:
            reaped, rounds = tick(svc, utcnow())
            for outcome in rounds:
                if outcome.moved or outcome.error:
                    log.warning("deadline sweep: %s", outcome.message)
            for job, lost_attempt in reaped:
                log.warning("job %s attempt %d lost its lease: now %s", job.id, lost_attempt, job.status)
                # A hung worker may still be alive: make sure it cannot write results late.
                pid_file = worker_pid_file(state_dir, job.id, lost_attempt)
                if pid_file.exists():
                    kill_group(int(pid_file.read_text()), grace_s=2)
        except ValidationError as exc:  # its message quotes a document's fields: name the kind only
            log.error("reaper pass failed on an invalid document (%d problems); trying again in %.1fs", exc.error_count(), interval_s)
        except Exception:
            log.exception("reaper pass failed; trying again in %.1fs", interval_s)
