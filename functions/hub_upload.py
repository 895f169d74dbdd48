"""An object landed in the hub bucket: a federation request, or a node's weight update.

The logic is `shared.hub.handle_hub_object`. The hub's own writes (global models)
land in the same bucket and are ignored there, so they cannot loop.
"""

from __future__ import annotations

import logging

import functions_framework
from cloudevents.http import CloudEvent

from shared import clients
from shared.events import storage_object
from shared.hub import handle_hub_object
from shared.jobs import utcnow

log = logging.getLogger("fedpipe.functions.hub_upload")


@functions_framework.cloud_event
def on_hub_upload(cloud_event: CloudEvent) -> None:
    obj = storage_object(cloud_event.data)
    services = clients.services()
    outcome = handle_hub_object(services, obj, utcnow())
    log.info("gs://%s/%s#%d: %s", obj.bucket, obj.name, obj.generation, outcome.message if outcome else "ignored: not a federation request")
