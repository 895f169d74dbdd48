"""Dead letters of a deployed fedpipe: events Pub/Sub gave up delivering (infra/delivery.tf).

Pub/Sub moves a message to the dead-letter topic after its subscription's last
delivery attempt; the `<dead-letter topic>-hold` subscription keeps them.
`peek` reads them without taking them away (nothing is acknowledged), so an
operator can look as often as they like and replay later. A message's data may
hold a node's manifest or an object's metadata: only its size is shown, never
its contents.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from google.cloud import pubsub_v1
from google.pubsub_v1.types import PubsubMessage
from pydantic import BaseModel
from rich.table import Table

from shared.config import Settings

# Attributes Pub/Sub adds when it dead-letters a message.
SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"
DEAD_LETTER_PREFIX = "CloudPubSubDeadLetter"

PROJECT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
SUBSCRIPTION_PATH = re.compile(r"projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/subscriptions/[A-Za-z][\w.~+%-]{2,254}")
MAX_PULL = 1000  # Pub/Sub's bound on one pull
MAX_ATTRIBUTE_CHARS = 200  # per attribute value shown


class DeadLetter(BaseModel, frozen=True):
    """One dead-lettered event, as the operator sees it."""

    message_id: str
    published_at: datetime | None
    source: str  # the subscription that gave up (short name), or the local router's trigger
    attempts: int | None  # Pub/Sub's count of delivery attempts at the source, if it said
    attributes: dict[str, str]  # the event's own attributes (object, node, data set, CloudEvent headers)
    data_bytes: int


def subscription_path(project: str, settings: Settings) -> str:
    """The deployed dead-letter hold subscription of `project` (infra/delivery.tf names it)."""
    if not PROJECT_ID.fullmatch(project):
        raise ValueError("a project id is 6-30 lowercase letters, digits or hyphens, starting with a letter")
    return f"projects/{project}/subscriptions/{settings.dead_letter_topic}-hold"


def check_subscription(path: str) -> str:
    if not SUBSCRIPTION_PATH.fullmatch(path):
        raise ValueError("a subscription is projects/<project>/subscriptions/<name>")
    return path


def from_message(message: PubsubMessage) -> DeadLetter:
    """Pure: what a pulled dead-letter message says, its data reduced to a size."""
    attributes = dict(message.attributes)
    source = attributes.get(SOURCE_SUBSCRIPTION, "").rsplit("/", 1)[-1] or attributes.get("trigger", "") or "?"
    count = attributes.get("CloudPubSubDeadLetterSourceDeliveryCount", "")
    return DeadLetter(
        message_id=message.message_id,
        published_at=message.publish_time,
        source=source,
        attempts=int(count) if count.isdigit() and len(count) <= 6 else None,
        attributes={k: v[:MAX_ATTRIBUTE_CHARS] for k, v in sorted(attributes.items()) if not k.startswith(DEAD_LETTER_PREFIX)},
        data_bytes=len(message.data),
    )


def peek(subscriber: pubsub_v1.SubscriberClient, subscription: str, limit: int) -> list[DeadLetter]:
    """Up to `limit` dead letters, oldest first; they stay on the subscription (handed back at once, never acked)."""
    if not 1 <= limit <= MAX_PULL:
        raise ValueError(f"limit must be 1 to {MAX_PULL}")
    response = subscriber.pull(request={"subscription": subscription, "max_messages": limit}, timeout=30)
    received = list(response.received_messages)
    if received:
        subscriber.modify_ack_deadline(
            request={"subscription": subscription, "ack_ids": [r.ack_id for r in received], "ack_deadline_seconds": 0}
        )
    return sorted((from_message(r.message) for r in received), key=lambda d: d.published_at or datetime.min.replace(tzinfo=UTC))


def table(letters: list[DeadLetter]) -> Table:
    out = Table("published", "source", "attempts", "event", "message", "data")
    for letter in letters:
        event = " ".join(f"{k}={v}" for k, v in letter.attributes.items())
        out.add_row(letter.published_at.isoformat(timespec="seconds") if letter.published_at else "", letter.source, str(letter.attempts or ""), event,
                    letter.message_id, f"{letter.data_bytes} B")
    return out
