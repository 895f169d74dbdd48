"""Counting a node's update: admit it, count it once in its round, or record why not.

Each node's update is its own document, created once (a duplicate event finds it there),
so nodes reporting together never contend for one document. The claims an upload carries
and its size are checked before its bytes are read: an upload of the wrong size is never
downloaded, and one bigger than EAGER_DOWNLOAD_BYTES only once its size matches the model.
Every update that is not counted is recorded with its reason, one record per uploaded version.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import datetime

from google.api_core.exceptions import NotFound, PreconditionFailed

from shared.aggregator_messages import AdmitReply, AdmitRequest
from shared.envelope import EnvelopeError, Purpose
from shared.federation import RoundStatus
from shared.fedstore import Federation, RefusalReason, RefusedUpdate, Round, Update
from shared.hub import admission
from shared.hub.admission import Claims, Refusal
from shared.hub.aggregation_io import VERIFIED
from shared.hub.aggregator_client import AggregatorUnavailable
from shared.hub.closing import advance, advance_seen
from shared.hub.context import Hub
from shared.hub.outcomes import UpdateKind, UpdateOutcome
from shared.ingest import RawObject
from shared.io_pool import parallel

log = logging.getLogger("fedpipe.hub")

EAGER_DOWNLOAD_BYTES = 8 * 2**20  # an upload up to this size downloads alongside the document reads


class KnownModels:
    """The federations this instance has read, by id, so an upload's size is checked before the
    download that goes out with the document reads. A federation's model never changes; should
    an id ever name another, only that early download is affected: admission reads the document."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: OrderedDict[str, Federation] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fid: str) -> Federation | None:
        with self._lock:
            return self._held.get(fid)

    def put(self, fid: str, fed: Federation) -> None:
        with self._lock:
            self._held[fid] = fed
            self._held.move_to_end(fid)
            while len(self._held) > self.capacity:
                self._held.popitem(last=False)


MODELS = KnownModels(capacity=256)


def record_update(hub: Hub, obj: RawObject, fid: str, r: int, node: str, attempt: int, now: datetime) -> UpdateOutcome:
    """Count `node`'s update once in round r of `fid`; an update after the round closed is recorded as late.

    `node` must be the uploader's verified identity (the update prefix it may write to, or
    the node API's token), never a field the upload itself carries.
    """
    claims = admission.read_claims(obj.metadata)

    def download() -> bytes | None:
        try:
            return hub.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        except (NotFound, PreconditionFailed):
            return None  # deleted or replaced since; a replacement has its own event

    # Every round's critical path: the reads go out together, and a small upload whose size
    # fits the model (as this instance knows it) downloads alongside them (unless only the aggregator may open it).
    known = MODELS.get(fid)
    eager = (isinstance(claims, Claims) and obj.size <= EAGER_DOWNLOAD_BYTES and known is not None and known.config is not None
             and not known.config.confidential_aggregation and admission.size_refusal(known, r, node, obj.size) is None)
    view, public_key, *downloaded = parallel(
        lambda: hub.store.update_view(fid, r, node), lambda: hub.public_key(node), *([download] if eager else [])
    )
    data = downloaded[0] if eager else None
    if eager and data is None:
        return UpdateOutcome(UpdateKind.IGNORED, detail="the update is gone")
    stored, rd = view.federation, view.round
    if stored is None or rd is None:
        # No round to record it under; nothing was counted.
        return UpdateOutcome(UpdateKind.REFUSED, RefusalReason.UNKNOWN_ROUND, "unknown round")
    fed = stored.doc
    MODELS.put(fid, fed)
    uri = f"gs://{obj.bucket}/{obj.name}"

    def refuse(refusal: Refusal, kind: UpdateKind = UpdateKind.REFUSED) -> UpdateOutcome:
        held = claims if isinstance(claims, Claims) else None
        hub.store.record_refusal(fid, r, RefusedUpdate(
            node=node, object=uri, generation=obj.generation, attempt=attempt, examples=held.examples if held else None,
            metrics=held.metrics if held else None, at=now, reason=refusal.reason, message=refusal.message,
        ))
        log.warning("update %s %s: %s", obj.name, kind.value, refusal.message)
        return UpdateOutcome(kind, refusal.reason, refusal.message)

    if node not in rd.expected:
        return refuse(Refusal(RefusalReason.NOT_A_MEMBER, f"{node} is not in federation {fid}"))
    if isinstance(claims, Refusal):
        return refuse(claims)
    if refusal := admission.size_refusal(fed, r, node, obj.size):
        return refuse(refusal)
    attested = fed.config.confidential_aggregation and rd.kind == "train"
    if attested:  # sealed to the attested aggregator: only it can open and check the weights
        verdict = admitted_by_aggregator(hub, fed, rd, node, obj, attempt, public_key)
        if verdict.gone:
            return UpdateOutcome(UpdateKind.IGNORED, detail="the update is gone")
        if verdict.refusal:
            return refuse(Refusal(verdict.refusal.reason, verdict.refusal.message))
    else:
        if data is None and (data := download()) is None:
            return UpdateOutcome(UpdateKind.IGNORED, detail="the update is gone")
        try:
            data = hub.envelope(node).open(data, obj.bucket, obj.name, Purpose.UPDATE)
        except EnvelopeError:
            return refuse(Refusal(RefusalReason.NOT_SEALED, "the update does not open under the node's key"))
        if refusal := (
            admission.signature_refusal(fed.config, fid, r, node, attempt, claims, data, obj.metadata, public_key)
            or admission.content_refusal(fed, rd, node, claims, data)
        ):
            return refuse(refusal)

    late = Refusal(RefusalReason.LATE, f"round {r} is closed")
    counted = view.counted
    if counted is not None and (counted.object, counted.generation) == (uri, obj.generation):
        return UpdateOutcome(UpdateKind.DUPLICATE, advance=advance(hub, fid, r, now))  # the same upload delivered again
    if counted is not None and counted.object == uri:
        return refuse(Refusal(RefusalReason.REPLACES_COUNTED, "replaces an update already counted"))  # the counted version is aggregated
    if rd.status is not RoundStatus.OPEN or view.marker is not None:
        return refuse(late, UpdateKind.LATE)
    update = Update(node=node, object=uri, generation=obj.generation, attempt=attempt, examples=claims.examples, metrics=claims.metrics, at=now)
    if not hub.store.add_update(fid, r, update):
        return UpdateOutcome(UpdateKind.DUPLICATE, advance=advance(hub, fid, r, now))  # this node's update counted meanwhile
    if rd.kind == "train" and not attested:
        VERIFIED.put(uri, obj.generation, data)  # the closing delivery aggregates it without a download
    outcome, marker = advance_seen(hub, fid, r, now, seen=(stored, rd))
    if marker is not None and node not in marker.participants:
        return refuse(late, UpdateKind.LATE)  # the round was closed without us between our checks and our write
    return UpdateOutcome(UpdateKind.RECORDED, advance=outcome)


def admitted_by_aggregator(
    hub: Hub, fed: Federation, rd: Round, node: str, obj: RawObject, attempt: int, public_key: str | None
) -> AdmitReply:
    """The attested aggregator's verdict on an update sealed to it: the same checks, made where the weights can be read."""
    if hub.aggregator is None:
        raise AggregatorUnavailable("this federation needs the attested aggregator, and FEDPIPE_AGGREGATOR_URL is not set")
    return hub.aggregator.admit(AdmitRequest(
        federation=fed, round=rd, node=node, object=f"gs://{obj.bucket}/{obj.name}", generation=obj.generation, attempt=attempt,
        metadata=obj.metadata, public_key=public_key,
    ))
