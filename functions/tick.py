"""The clock: Cloud Scheduler publishes to the tick topic every minute; see shared/timekeeper.py."""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from shared import clients
from shared.jobs import utcnow
from shared.timekeeper import tick

log = logging.getLogger("fedpipe.functions.tick")


@functions_framework.cloud_event
def on_tick(cloud_event: CloudEvent) -> None:
    services = clients.services()
    reaped, rounds = tick(services, utcnow())
    for job, lost in reaped:
        log.warning("job %s attempt %d lost its lease: now %s", job.id, lost, job.status)
    for outcome in rounds:
        log.log(logging.WARNING if outcome.moved or outcome.error else logging.INFO, "deadline sweep: %s", outcome.message)
