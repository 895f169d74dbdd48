"""Shards of a file are ready: check the message against ingest's record, add the file to the
data set's manifest; a complete data set gets a job.

The logic is `shared.manifest.handle_shard_ready`. A message that does not match what
ingest wrote is quarantined with its reason and acknowledged: a retry cannot fix it.
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from shared import clients
from shared.events import pubsub_message
from shared.jobs import utcnow
from shared.manifest import handle_shard_ready

log = logging.getLogger("fedpipe.functions.shard_ready")


@functions_framework.cloud_event
def on_shard_ready(cloud_event: CloudEvent) -> None:
    message = pubsub_message(cloud_event.data)
    outcome = handle_shard_ready(clients.db(), clients.settings(), message.data, message.message_id, utcnow())
    if outcome.ready is None or outcome.status == "refused":
        log.error("message %s refused: %s", message.message_id, outcome.reason)
        return
    ready = outcome.ready
    log.info("%s/%s upload #%d: %s%s", ready.node, ready.dataset, ready.generation, outcome.status,
             f"; data set complete, job {outcome.job.id} pending" if outcome.job else "")
