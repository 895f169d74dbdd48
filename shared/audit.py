"""The audit trail of key releases, refusals and attestation failures.

Each event is written twice: one JSON line on stdout in Cloud Logging's structured
format (what the Cloud Run and Cloud Functions log agents parse: `severity`, `message`,
`logging.googleapis.com/labels`, `timestamp`), and a typed record in the Firestore
`audit` collection, which `fedpipe audit` lists. The record's fields are a closed set
(`extra="forbid"`): a key, token, nonce or plaintext has no field to go in, so passing
one fails loudly instead of being logged.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TextIO

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("fedpipe.audit")

AUDIT_COLLECTION = "audit"  # the lead may move this into shared/config.Settings


class AuditEvent(StrEnum):
    KEY_RELEASED = "key_released"  # the broker encrypted or decrypted for an attested worker
    KEY_REFUSED = "key_refused"  # a token was verified but the policy, nonce or audience refused it
    ATTESTATION_FAILED = "attestation_failed"  # no valid token at all, or a worker's re-attestation failed


SEVERITY = {AuditEvent.KEY_RELEASED: "NOTICE", AuditEvent.KEY_REFUSED: "WARNING", AuditEvent.ATTESTATION_FAILED: "ERROR"}


class AuditRecord(BaseModel):
    """What happened, to which node's key, for which workload, and why not: never a secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: AuditEvent
    at: datetime
    node: str | None = None
    operation: str | None = Field(default=None, max_length=40)  # encrypt | decrypt | attest | reattest
    reason: str | None = Field(default=None, max_length=60)
    image_digest: str | None = Field(default=None, max_length=80)
    hwmodel: str | None = Field(default=None, max_length=40)
    service_account: str | None = Field(default=None, max_length=200)
    key_id: int | None = None  # the KEK's primary key id (local keyset), never key material
    job_id: str | None = Field(default=None, max_length=200)
    source: str = Field(default="key-broker", max_length=40)  # who wrote it: key-broker | worker

    def message(self) -> str:
        what = f"{self.event.value} {self.operation or ''} node={self.node or '-'}".replace("  ", " ")
        return f"{what} reason={self.reason}" if self.reason else what


class AuditSink(Protocol):
    def add(self, record: AuditRecord) -> None: ...


class FirestoreAuditStore:
    """The `audit` collection: records added, newest listed first."""

    def __init__(self, db, collection: str = AUDIT_COLLECTION) -> None:
        self.db, self.collection = db, collection

    def add(self, record: AuditRecord) -> None:
        self.db.collection(self.collection).add(record.model_dump(mode="python", exclude_none=True))

    def recent(self, node: str | None = None, limit: int = 50) -> list[AuditRecord]:
        from google.cloud import firestore

        query = self.db.collection(self.collection)
        if node:
            query = query.where(filter=firestore.FieldFilter("node", "==", node))
        docs = query.order_by("at", direction=firestore.Query.DESCENDING).limit(limit).stream()
        return [AuditRecord.model_validate(doc.to_dict()) for doc in docs]


def log_entry(record: AuditRecord) -> dict[str, Any]:
    """The record as a Cloud Logging structured entry (one JSON object per line on stdout)."""
    labels = {"fedpipe_audit": record.event.value, "source": record.source}
    if record.node:
        labels["node"] = record.node
    return {
        "severity": SEVERITY[record.event],
        "message": record.message(),
        "timestamp": record.at.isoformat(),
        "logging.googleapis.com/labels": labels,
        "audit": record.model_dump(mode="json", exclude_none=True),
    }


class BackgroundSink:
    """Stores audit records off the request path, in order, as Cloud Audit Logs are written for Cloud KMS.

    The key broker's reply must not wait for a Firestore write (about 10 ms each under a
    federation's load, two releases per node and round); the Cloud Logging line, written
    first and synchronously, is the trail that cannot be lost. At most `max_pending`
    records wait; beyond that a record is only in the log, and the log says so.
    """

    def __init__(self, store: AuditSink, max_pending: int = 10_000) -> None:
        self.store = store
        self._pending: queue.Queue[AuditRecord] = queue.Queue(max_pending)
        threading.Thread(target=self._run, daemon=True, name="audit-store").start()

    def add(self, record: AuditRecord) -> None:
        try:
            self._pending.put_nowait(record)
        except queue.Full:
            log.error("audit record %s not stored: %d records already wait for the store", record.event.value, self._pending.maxsize)

    def _run(self) -> None:
        while True:
            record = self._pending.get()
            try:
                self.store.add(record)
            except Exception:
                log.exception("audit record %s not stored", record.event.value)


class Auditor:
    """Writes each event to the log stream and, when it has one, to the store; a store failure is logged, not raised:
    refusing a key must not turn into a 500 because Firestore blinked, and the log line is already written."""

    def __init__(self, store: AuditSink | None, stream: TextIO | None = None, source: str = "key-broker") -> None:
        self.store, self.stream, self.source = store, stream, source

    def __call__(self, event: AuditEvent, now: datetime | None = None, **fields: Any) -> AuditRecord:
        record = AuditRecord(event=event, at=now or datetime.now(UTC), source=self.source, **fields)
        stream = self.stream or sys.stdout
        stream.write(json.dumps(log_entry(record)) + "\n")
        stream.flush()
        if self.store is not None:
            try:
                self.store.add(record)
            except Exception:
                log.exception("audit record %s not stored", record.event.value)
        return record


def audit(event: AuditEvent, **fields: Any) -> AuditRecord:
    """Write one audit event with this process's Firestore client (shared.clients)."""
    from shared import clients

    return Auditor(FirestoreAuditStore(clients.db()), source=fields.pop("source", "key-broker"))(event, **fields)
