"""Create the buckets and topics a fedpipe deployment has (Terraform does this in production)."""

from __future__ import annotations

from google.api_core.exceptions import AlreadyExists, Conflict
from google.cloud import pubsub_v1, storage

from emulators.endpoints import (
    FIRESTORE_EVENTS_TOPIC,
    GCS_NOTIFICATIONS_TOPIC,
    REPLAY_TOPIC,
)
from shared.config import Settings


def topics(settings: Settings) -> list[str]:
    declared = [settings.shard_ready_topic, settings.fed_rounds_topic, settings.tick_topic, settings.dead_letter_topic]
    return [*declared, GCS_NOTIFICATIONS_TOPIC, FIRESTORE_EVENTS_TOPIC, REPLAY_TOPIC]


def ensure_topics(settings: Settings) -> None:
    publisher = pubsub_v1.PublisherClient()
    for topic in topics(settings):
        try:
            publisher.create_topic(name=publisher.topic_path(settings.project, topic))
        except AlreadyExists:
            pass


def ensure_buckets(settings: Settings) -> None:
    client = storage.Client(project=settings.project)
    for bucket in settings.all_buckets():
        try:
            client.create_bucket(bucket)
        except Conflict:
            pass
