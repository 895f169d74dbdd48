"""The one declaration of which function listens to which bucket, topic or document.

The local router (emulators/router.py) delivers events from this list, and
`fedpipe infra render` turns the same list into Terraform variables, so local and
production wiring cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config import Settings

STORAGE_FINALIZED = "google.cloud.storage.object.v1.finalized"
PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
FIRESTORE_WRITTEN = "google.cloud.firestore.document.v1.written"


@dataclass(frozen=True)
class Trigger:
    """An Eventarc trigger: events of `event_type` matching the filter go to `function`."""

    name: str
    function: str  # entry point in functions/main.py, also the Cloud Run service
    kind: Literal["storage", "pubsub", "firestore"]
    event_type: str
    bucket: str | None = None  # storage
    topic: str | None = None  # pubsub
    document: str | None = None  # firestore path pattern, e.g. "jobs/{jobId}"


def triggers(settings: Settings) -> list[Trigger]:
    """Every trigger of a fedpipe deployment, in delivery order of the reference chain."""
    raw_uploads = [
        Trigger(
            name=f"raw-upload-{node}",
            function="on_raw_upload",
            kind="storage",
            event_type=STORAGE_FINALIZED,
            bucket=settings.raw_bucket(node),
        )
        for node in settings.nodes
    ]
    return [
        *raw_uploads,
        Trigger(
            name="hub-upload",
            function="on_hub_upload",
            kind="storage",
            event_type=STORAGE_FINALIZED,
            bucket=settings.hub_bucket,
        ),
        Trigger(
            name="shard-ready",
            function="on_shard_ready",
            kind="pubsub",
            event_type=PUBSUB_PUBLISHED,
            topic=settings.shard_ready_topic,
        ),
        Trigger(
            name="tick",
            function="on_tick",
            kind="pubsub",
            event_type=PUBSUB_PUBLISHED,
            topic=settings.tick_topic,
        ),
        Trigger(
            name="job-written",
            function="on_job_written",
            kind="firestore",
            event_type=FIRESTORE_WRITTEN,
            document=f"{settings.jobs_collection}/{{jobId}}",
        ),
    ]


def function_names(settings: Settings) -> list[str]:
    """Entry points that events are delivered to, in declaration order."""
    return list(dict.fromkeys(t.function for t in triggers(settings)))


# Functions called over HTTP rather than by a trigger: workers call the node API with an ID token.
HTTP_FUNCTIONS = ("node_api",)
