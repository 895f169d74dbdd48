"""The hub's entry points, as the functions and the node API call them: with the cloud clients (Services).

`handle_hub_object` is what happens when an object lands in the hub bucket:
`requests/{id}.json` starts a federation. A node's update under `updates/{node}/{id}/`
counts only once its worker reports it through the node API (shared/node_api.py), as
the node of a verified ID token: `record_update` admits it and counts it in its
round, which closes once every node (or a quorum, after the deadline) has reported. Every step is safe to repeat:
a node counts once per round, a round's global model is written once to a fixed
path, and only the write that closes a round opens the next one.
"""

from __future__ import annotations

from datetime import datetime

from google.cloud import firestore

from shared.federation import REQUEST_PATH
from shared.fedstore import FirestoreFederationStore
from shared.hub import closing, recording, starting
from shared.hub.context import Hub
from shared.hub.outcomes import AdvanceOutcome, StartOutcome, SweepOutcome, UpdateOutcome
from shared.ingest import RawObject, Services


def handle_hub_object(svc: Services, obj: RawObject, now: datetime) -> StartOutcome | None:
    """None for any object but a request: updates count when their node reports them, the global
    models are the hub's own writes. An object's path names a node, but nothing proves who wrote it."""
    if match := REQUEST_PATH.match(obj.name):
        return starting.start_from_request(Hub.of(svc), obj, match["fid"], now)
    return None


def record_update(svc: Services, obj: RawObject, fid: str, r: int, node: str, attempt: int, now: datetime) -> UpdateOutcome:
    return recording.record_update(Hub.of(svc), obj, fid, r, node, attempt, now)


def advance(svc: Services, fid: str, r: int, now: datetime, recover: bool = False) -> AdvanceOutcome:
    return closing.advance(Hub.of(svc), fid, r, now, recover=recover)


def sweep_deadlines(svc: Services, now: datetime) -> list[SweepOutcome]:
    return closing.sweep_deadlines(Hub.of(svc), now)


def federation_store(svc: Services) -> FirestoreFederationStore:
    """The hub's documents in Firestore: typed reads, and the references to watch them."""
    return FirestoreFederationStore(svc.db, svc.settings)


def fed_ref(svc: Services, fid: str) -> firestore.DocumentReference:
    return federation_store(svc).federation_ref(fid)


def round_ref(svc: Services, fid: str, r: int) -> firestore.DocumentReference:
    return federation_store(svc).round_ref(fid, r)
