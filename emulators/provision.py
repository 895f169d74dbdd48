"""Create the buckets, topics and node keys a fedpipe deployment has (Terraform and
`fedpipe nodes register` do this in production)."""

from __future__ import annotations

from pathlib import Path

from google.api_core.exceptions import AlreadyExists, Conflict
from google.cloud import firestore, pubsub_v1, storage

from emulators.endpoints import (
    FIRESTORE_EVENTS_TOPIC,
    GCS_NOTIFICATIONS_TOPIC,
    REPLAY_TOPIC,
    keystore_dir,
)
from emulators.metadata_server import local_identity
from shared.config import Settings
from shared.envelope import HUB, LocalKeyStore
from shared.jobs import utcnow
from shared.node_registry import NodeRegistry
from shared.signing import create_node_key


def topics(settings: Settings) -> list[str]:
    declared = [settings.shard_ready_topic, settings.tick_topic, settings.dead_letter_topic]
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


def node_key_file(state_dir: Path, node: str) -> Path:
    """Where the local stack keeps `node`'s update-signing key (Cloud KMS holds it in production)."""
    return state_dir / "keys" / f"{node}.pem"


def ensure_nodes(settings: Settings, state_dir: Path) -> None:
    """Register every node: its workers' local identity (the node API speaks to them as that node)
    and a signing key (the hub admits only updates it signed)."""
    registry = NodeRegistry(firestore.Client(project=settings.project), settings)
    for node in settings.nodes:
        path = node_key_file(state_dir, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        registry.register_key(node, create_node_key(path), f"local:{path}", utcnow())
        registry.register_identity(node, local_identity(settings.project, node), utcnow())
        LocalKeyStore(keystore_dir(state_dir)).ensure(node)  # its key-encryption key
    LocalKeyStore(keystore_dir(state_dir)).ensure(HUB)  # the hub's, for global models
