"""The router's delivery log: what was delivered, to whom, how it went (`fedpipe events tail`)."""

from __future__ import annotations

from datetime import datetime

from google.cloud import firestore

from emulators.endpoints import DELIVERIES_COLLECTION
from emulators.eventarc import OutgoingEvent


def record_id(trigger: str, event_id: str) -> str:
    return f"{trigger}~{event_id}".replace("/", "_")


class DeliveryLog:
    def __init__(self, db: firestore.Client) -> None:
        self.collection = db.collection(DELIVERIES_COLLECTION)

    def record(
        self,
        trigger: str,
        function: str,
        event: OutgoingEvent,
        status: str,
        attempts: int,
        now: datetime,
        code: int | None = None,
        error: str | None = None,
    ) -> None:
        """Upsert one event's delivery state; `status` is delivered, retrying or dead_lettered."""
        doc = {
            "trigger": trigger,
            "function": function,
            "event_id": event.id,
            "type": event.type,
            "subject": event.subject,
            "source": event.headers.get("ce-source", ""),
            "status": status,
            "attempts": attempts,
            "last_code": code,
            "last_error": error,
            "updated_at": now,
            "event": event.to_json(),
        }
        self.collection.document(record_id(trigger, event.id)).set(doc, merge=True)

    def recent(self, limit: int = 50, status: str | None = None) -> list[dict]:
        query = self.collection
        if status:
            query = query.where(filter=firestore.FieldFilter("status", "==", status))
        docs = query.order_by("updated_at", direction=firestore.Query.DESCENDING).limit(limit).stream()
        return [{"id": d.id, **d.to_dict()} for d in docs]

    def find(self, key: str) -> dict | None:
        """A record by its id, or by the event id alone when that is unambiguous."""
        snap = self.collection.document(key).get()
        if snap.exists:
            return {"id": snap.id, **snap.to_dict()}
        matches = list(self.collection.where(filter=firestore.FieldFilter("event_id", "==", key)).limit(2).stream())
        if len(matches) == 1:
            return {"id": matches[0].id, **matches[0].to_dict()}
        return None
