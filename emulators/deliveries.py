"""The router's delivery log: what was delivered, to whom, how it went (`fedpipe events tail`)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime

from google.cloud import firestore

from emulators.endpoints import DELIVERIES_COLLECTION
from emulators.eventarc import OutgoingEvent

log = logging.getLogger("fedpipe.router")

# When an event reached each step, kept on its record so `bench/events.py` can tell which step a
# regression is in: published_at (the Pub/Sub emulator took the message), received_at (the
# router's callback began), posted_at (the last attempt's POST began), answered_at (its answer,
# or its failure, came back). The record's own commit is the document's update_time.
STAGES = ("published_at", "received_at", "posted_at", "answered_at")


def record_id(trigger: str, event_id: str) -> str:
    return f"{trigger}~{event_id}".replace("/", "_")


def delivery_doc(
    trigger: str,
    function: str,
    event: OutgoingEvent,
    status: str,
    attempts: int,
    now: datetime,
    code: int | None = None,
    error: str | None = None,
    stages: dict[str, datetime] | None = None,
) -> dict:
    """One event's delivery state; `status` is delivered, retrying or dead_lettered.

    Every record has every field, so the last of several records for one event is the whole state.
    """
    return {
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
        **{stage: (stages or {}).get(stage) for stage in STAGES},
        "event": event.to_json(),
    }


def coalesce(records: list[tuple[str, dict]]) -> dict[str, dict]:
    """The last record of each event, in first-seen order: what one batch has to write.

    A batch may hold an event's `retrying` record and its `delivered` one; both have every
    field, so the later alone leaves the document as writing both in turn would.
    """
    latest: dict[str, dict] = {}
    for key, doc in records:
        latest[key] = doc
    return latest


class DeliveryLog:
    def __init__(self, db: firestore.Client) -> None:
        self.db = db
        self.collection = db.collection(DELIVERIES_COLLECTION)

    def write(self, records: dict[str, dict]) -> None:
        """Upsert records by id in one commit (at most 500, Firestore's limit for a batch)."""
        batch = self.db.batch()
        for key, doc in records.items():
            batch.set(self.collection.document(key), doc, merge=True)
        batch.commit()

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


class RecordWriter:
    """Commits delivery records on one background thread, many to a commit, then runs each one's `then`.

    A record written on the delivering thread made every event wait for a Firestore commit
    after its POST, one commit per event: on shared cores the emulator's commits slowed to
    hundreds of ms, and the router fell seconds behind the uploads. Here the delivery only
    queues the record; `then` is the message's ack, run once the record is committed, so a
    router that dies first leaves the message unacked and Pub/Sub delivers it again: a record
    is never lost, only its event delivered twice (functions are idempotent). The queue is
    bounded: when Firestore falls behind, `put` blocks the deliveries instead of holding more.
    """

    _CLOSE = None  # queued by close(), after every record put before it

    def __init__(self, deliveries: DeliveryLog, max_pending: int = 1000, max_batch: int = 200, retry_s: float = 0.5) -> None:
        self.deliveries = deliveries
        self.max_batch = max_batch
        self.retry_s = retry_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="delivery-records")
        self._thread.start()

    def put(self, key: str, doc: dict, then: Callable[[], None] = lambda: None) -> None:
        self._queue.put((key, doc, then))

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then stop; a record put after this is not written (nor its message acked)."""
        self._closing.set()
        self._queue.put(self._CLOSE)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        closed = False
        while not closed:
            # Block for one record, then take what else is queued: one commit for a burst, no wait when idle.
            items = [self._queue.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closed = self._CLOSE in items
            records = [item for item in items if item is not self._CLOSE]
            if records and self._commit(coalesce([(key, doc) for key, doc, _ in records])):
                for _, _, then in records:
                    then()

    def _commit(self, records: dict[str, dict]) -> bool:
        """Commit, retrying until it succeeds; give up only when closing (the emulators stop with us)."""
        while True:
            try:
                self.deliveries.write(records)
                return True
            except Exception:
                if self._closing.is_set():
                    log.exception("closing: %d delivery records not written, their messages not acked", len(records))
                    return False
                log.exception("could not write %d delivery records; retrying in %.1fs", len(records), self.retry_s)
                time.sleep(self.retry_s)
