"""A job document was written: launch its worker if it is pending, stop its run if the write cancelled it.

Every write to `jobs/{id}` comes here, including this function's own claim and the
worker's heartbeats; only a pending job, or a write that cancelled a job, is acted on.
The claim transaction makes sure each attempt is launched once however often the event
arrives, and stopping a run twice is stopping it once.
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from shared import clients
from shared.events import document_change
from shared.jobs import JobStatus, utcnow
from shared.jobstore import JobStore
from shared.launch import cancelled_execution, launch_pending_job, stop_run
from shared.launchers.select import launcher_from_env

log = logging.getLogger("fedpipe.functions.job_written")


@functions_framework.cloud_event
def on_job_written(cloud_event: CloudEvent) -> None:
    change = document_change(cloud_event.data)
    execution = cancelled_execution(change.before, change.after)
    if execution is not None:
        stopped = stop_run(launcher_from_env(), execution)
        log.info("job %s cancelled: %s", change.id, stopped)
        if stopped.outcome == "failed":
            raise RuntimeError(f"job {change.id}: {stopped}")  # redelivered, with backoff, until it stops or dead-letters
        return
    if change.after is None or change.after.get("status") != JobStatus.PENDING:
        return  # deleted, or a write after the claim (our own, or the worker's)
    store = JobStore(clients.db(), clients.settings())
    outcome = launch_pending_job(store, launcher_from_env(), change.id, utcnow())
    log.info("job %s: %s", change.id, outcome)
