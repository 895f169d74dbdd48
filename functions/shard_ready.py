"""Shards of a file are ready: add them to the data set manifest; a complete data set gets a job."""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent
from pydantic import ValidationError

from shared import clients
from shared.events import pubsub_message
from shared.jobs import utcnow
from shared.manifest import ShardReady, record_shards

log = logging.getLogger("fedpipe.functions.shard_ready")


@functions_framework.cloud_event
def on_shard_ready(cloud_event: CloudEvent) -> None:
    message = pubsub_message(cloud_event.data)
    try:
        ready = ShardReady.model_validate_json(message.data)
    except ValidationError as exc:
        # A malformed message will not get better with retries: log it and acknowledge.
        log.error("message %s is not a shard-ready message: %s", message.message_id, exc)
        return
    changed, job = record_shards(clients.db(), clients.settings(), ready, utcnow())
    log.info(
        "%s/%s %s#%d: %s%s", ready.node, ready.dataset, ready.file, ready.generation,
        "recorded" if changed else "duplicate", f"; data set complete, job {job.id} pending" if job else "",
    )
