"""A file landed in a node's raw bucket: validate, shard, publish shard-ready.

The logic is `shared.ingest.handle_raw_object`; this handler only decodes the event.
A bad file is quarantined and acknowledged; only infrastructure errors raise (and
are retried by Eventarc). An event whose object cannot be decoded is quarantined too:
raising would only retry it until it is dead-lettered.
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent
from google.protobuf.json_format import ParseError

from shared import clients
from shared.events import storage_object
from shared.ingest import handle_raw_object, refuse_undecodable
from shared.jobs import utcnow
from shared.quarantine import object_source

log = logging.getLogger("fedpipe.functions.raw_upload")


@functions_framework.cloud_event
def on_raw_upload(cloud_event: CloudEvent) -> None:
    services = clients.services()
    try:
        obj = storage_object(cloud_event.data)
    except (ValueError, ParseError):  # UnicodeDecodeError is a ValueError; ParseError names a field, never its value
        bucket = cloud_event["source"].rpartition("/buckets/")[2]
        log.error("event %s: %s", cloud_event["id"], refuse_undecodable(services, bucket, cloud_event["id"], utcnow()))
        return
    outcome = handle_raw_object(services, obj, cloud_event["id"], utcnow())
    log.info("%r#%d: %s", object_source(obj.bucket, obj.name), obj.generation, outcome)  # %r: a name may hold a newline
