"""A file landed in a node's raw bucket: validate, shard, publish shard-ready.

The logic is `shared.ingest.handle_raw_object`; this handler only decodes the event.
A bad file is quarantined and acknowledged; only infrastructure errors raise (and
are retried by Eventarc).
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from shared import clients
from shared.events import storage_object
from shared.ingest import handle_raw_object
from shared.jobs import utcnow

log = logging.getLogger("fedpipe.functions.raw_upload")


@functions_framework.cloud_event
def on_raw_upload(cloud_event: CloudEvent) -> None:
    obj = storage_object(cloud_event.data)
    services = clients.services()
    outcome = handle_raw_object(services, obj, cloud_event["id"], utcnow())
    log.info("%r#%d: %s", f"gs://{obj.bucket}/{obj.name}", obj.generation, outcome)  # %r: a name may hold a newline
