"""Quarantine: input that can never be used is kept, with its reason, and acknowledged.

A bad file is copied to its node's quarantine bucket; a message that cannot be acted
on (a shard-ready message that does not match what ingest wrote) is kept in its
record. Either way the event is acknowledged, never retried: retrying cannot make it
good, and a retry loop would hide it. `fedpipe quarantine` lists the records.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime

from google.cloud import firestore
from pydantic import BaseModel, Field

from shared.config import Settings
from shared.datasets import MAX_OBJECT_NAME_BYTES

log = logging.getLogger("fedpipe.quarantine")

MAX_PROBLEMS = 100  # each refused part listed on its own, up to this many


class QuarantineRecord(BaseModel, frozen=True):
    """Why one input was refused. Reasons are short codes; details never quote cell values."""

    node: str | None = Field(description="None when a refused message names no node of this deployment")
    dataset: str | None = None
    source: str = Field(max_length=2048, description="gs://bucket/object (see object_source), or pubsub://topic/message-id for a refused message")
    generation: int | None = None
    reason: str
    detail: str
    problems: list[str] = Field(default=[], description="each refused part on its own, e.g. every bad name of a declaration")
    kept_at: str | None = Field(default=None, description="where the refused bytes are kept")
    at: datetime


class QuarantineStore:
    """The `quarantine` collection; a record's id is derived from its source, so a repeat overwrites it."""

    def __init__(self, db: firestore.Client, settings: Settings) -> None:
        self.collection = db.collection(settings.quarantine_collection)

    @staticmethod
    def record_id(record: QuarantineRecord) -> str:
        # A digest: an object name may hold '/' or be longer than a document id allows.
        digest = hashlib.sha256(record.source.encode()).hexdigest()[:32]
        return f"{record.node or '-'}~{digest}~g{record.generation or 0}"

    def put(self, record: QuarantineRecord) -> None:
        self.collection.document(self.record_id(record)).set(record.model_dump(mode="python"))
        log.warning("quarantined %r: %s: %s", record.source, record.reason, record.detail)

    def recent(self, limit: int = 50, dataset: str | None = None) -> list[QuarantineRecord]:
        query = self.collection
        if dataset is not None:
            query = query.where(filter=firestore.FieldFilter("dataset", "==", dataset))
        else:
            query = query.order_by("at", direction=firestore.Query.DESCENDING).limit(limit)
        return [QuarantineRecord.model_validate(snap.to_dict()) for snap in query.stream()]


def object_source(bucket: str, name: str) -> str:
    """`gs://bucket/name` as a record and logs show it; a name longer than Cloud Storage allows
    (only a forged event has one) is cut, and told apart from others by its digest."""
    if len(name.encode()) <= MAX_OBJECT_NAME_BYTES:
        return f"gs://{bucket}/{name}"
    return f"gs://{bucket}/{name[:200]}...(sha256 {hashlib.sha256(name.encode()).hexdigest()[:16]})"


def copy_name(object_name: str, generation: int) -> str:
    """Where a refused object's bytes are kept in the quarantine bucket: its own name when that fits."""
    name = f"{object_name}#g{generation}"
    if len(name.encode()) <= MAX_OBJECT_NAME_BYTES:
        return name
    return f"long-names/{hashlib.sha256(object_name.encode()).hexdigest()}#g{generation}"
