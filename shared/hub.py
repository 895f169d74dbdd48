"""The hub of a federation: start it, record node updates, close rounds, aggregate, broadcast.

`handle_hub_object` is what happens when an object lands in the hub bucket:
`requests/{id}.json` starts a federation, and a node's update under
`updates/{node}/{id}/` is verified and recorded in the round document. Once every
node (or a quorum, after the deadline) has reported, `advance` streams the updates
into a single accumulator (memory stays a few models however many nodes report, plus
the updates this instance verified, held for the close up to VERIFIED's bound),
writes the new global model, and opens and broadcasts the next round.

Every step is safe to repeat: a node counts once per round, the global model of a
round is written to a fixed path with the same bytes, and only the transaction
that closes a round opens the next one, so no round is counted twice however often
events arrive or the hub restarts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from datetime import datetime
from functools import partial

import numpy as np
from google.api_core.exceptions import AlreadyExists, FailedPrecondition, NotFound, PreconditionFailed
from google.cloud import firestore
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import gcs_uri, node_keys, signing, weights
from shared.aggregation import ServerOptimizer, StreamingMean
from shared.datasets import DatasetSpec, FeatureStats
from shared.federation import (
    REQUEST_PATH,
    UPDATE_PATH,
    FederationConfig,
    RoundStatus,
    close_decision,
    global_model_object,
    member_id,
    new_round,
    round_key,
    server_state_object,
    weighted_metrics,
)
from shared.ingest import RawObject, Services
from shared.io_pool import IO, parallel
from shared.jobs import DatasetRef, FederationRef, Job, JobSpec
from shared.jobstore import JobStore
from shared.model_spec import param_spec

log = logging.getLogger("fedpipe.hub")


class FederationError(ValueError):
    """The federation cannot start as declared (e.g. a node's data set is not complete)."""


def fed_ref(svc: Services, fid: str) -> firestore.DocumentReference:
    return svc.db.collection(svc.settings.federations_collection).document(fid)


def round_ref(svc: Services, fid: str, r: int) -> firestore.DocumentReference:
    return fed_ref(svc, fid).collection("rounds").document(round_key(r))


def handle_hub_object(svc: Services, obj: RawObject, now: datetime) -> str:
    if match := REQUEST_PATH.match(obj.name):
        return start_from_request(svc, obj, match["fid"], now)
    if match := UPDATE_PATH.match(obj.name):
        return record_update(svc, obj, match["fid"], int(match["round"]), match["node"], int(match["attempt"]), now)
    return "ignored: not a request or an update"  # e.g. the global models the hub writes itself


def start_from_request(svc: Services, obj: RawObject, fid: str, now: datetime) -> str:
    """A config dropped at requests/{id}.json; a bad one is recorded as rejected, never retried."""
    try:
        data = svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
    except (NotFound, PreconditionFailed):
        # Deleted or replaced since (a replacement has its own event): no retry can read this
        # version, so the event is acknowledged with the reason instead of failing until dead-lettered.
        log.warning("request gs://%s/%s#%d is gone; ignored", obj.bucket, obj.name, obj.generation)
        return "ignored: the request is gone"
    try:
        config = FederationConfig.model_validate_json(data)
        if config.id != fid:
            raise FederationError(f"the file is named {fid}.json but declares id {config.id!r}")
        started = start_federation(svc, config, now)
    except (ValidationError, FederationError) as exc:
        reject(svc, fid, str(exc), now)
        return f"rejected: {exc}"
    return "started" if started else "duplicate: already started"


def reject(svc: Services, fid: str, error: str, now: datetime) -> None:
    ref = fed_ref(svc, fid)
    if not ref.get().exists:
        ref.set({"status": "rejected", "error": error, "created_at": now, "updated_at": now})


def _node_inputs(svc: Services, config: FederationConfig) -> tuple[int, int, FeatureStats, dict[str, str], dict[str, int]]:
    """Check every node has a signing key (if required) and a complete data set of one schema; merge their statistics.

    Only aggregate statistics (count, mean, M2 per feature) leave a node, so every
    node standardizes with the same global mean and std, as centralized training would.
    """
    schemas, stats, versions = set(), [], {}
    datasets = svc.db.collection(svc.settings.datasets_collection)
    key_refs = [node_keys.node_ref(svc.db, svc.settings, n.name) for n in config.nodes] if config.signed_updates else []
    snaps = get_documents(svc, *key_refs, *(datasets.document(DatasetRef(node=n.name, dataset=n.dataset).id) for n in config.nodes))
    keys, dataset_snaps = snaps[: len(key_refs)], snaps[len(key_refs):]
    unregistered = [n.name for n, key in zip(config.nodes, keys) if not key.exists]
    if unregistered:
        raise FederationError(f"no registered signing key for {', '.join(unregistered)} (fedpipe nodes register)")
    for node, snap in zip(config.nodes, dataset_snaps):
        if not snap.exists or snap.get("status") != "complete":
            raise FederationError(f"data set {node.name}/{node.dataset} is not complete")
        spec = DatasetSpec.model_validate(snap.get("spec"))
        schemas.add((tuple(spec.features), spec.num_classes))
        stats.append(FeatureStats.model_validate(snap.get("stats")))
        versions[node.name] = snap.get("version")
    if len(schemas) != 1:
        raise FederationError(f"the nodes' data sets differ in features or classes: {sorted(schemas)}")
    (features, num_classes), = schemas
    merged = stats[0]
    for s in stats[1:]:
        merged = merged.merge(s)
    param_spec(config.model, len(features), num_classes, config.hidden)  # raises for e.g. a cnn on non-square data
    rows = {node.name: s.count for node, s in zip(config.nodes, stats)}  # what each node's claims are bounded by
    return len(features), num_classes, merged, versions, rows


def start_federation(svc: Services, config: FederationConfig, now: datetime) -> bool:
    """Create the federation and round 1, one job per node, and broadcast round 1. False if it exists."""
    try:
        n_features, num_classes, stats, versions, rows = _node_inputs(svc, config)
    except ValueError as exc:
        raise FederationError(str(exc)) from exc
    jobs = {
        node.name: Job.new(
            member_id(config.id, node.name),
            JobSpec(
                dataset=DatasetRef(node=node.name, dataset=node.dataset, version=versions[node.name]), train=config.train_spec(),
                federation=FederationRef(id=config.id, node=node.name),
                max_attempts=config.max_attempts, lease_seconds=config.lease_seconds,
            ),
            now,
        )
        for node in config.nodes
    }
    doc = {
        "config": config.model_dump(mode="json"), "status": "running", "round": 1, "n_features": n_features,
        "num_classes": num_classes, "stats": stats.model_dump(), "node_rows": rows, "global_model_uri": None,
        "jobs": {name: job.id for name, job in jobs.items()}, "created_at": now, "updated_at": now,
    }

    @firestore.transactional
    def create(transaction: firestore.Transaction) -> bool:
        if fed_ref(svc, config.id).get(transaction=transaction).exists:
            return False
        transaction.create(fed_ref(svc, config.id), doc)
        transaction.create(round_ref(svc, config.id, 1), new_round(config, 1, now))
        return True

    created = create(svc.db.transaction())
    # Also on a redelivery: a first try may have died between the transaction and here.
    # Creating a job that exists is a no-op, and a repeated broadcast only wakes workers.
    store = JobStore(svc.db, svc.settings)
    parallel(*(partial(store.create, job) for job in jobs.values()))  # each launches its node's worker: none waits on another
    if created or fed_ref(svc, config.id).get().get("round") == 1:
        broadcast(svc, config.id, 1)
    return created


def broadcast(svc: Services, fid: str, r: int) -> None:
    topic = svc.publisher.topic_path(svc.settings.project, svc.settings.fed_rounds_topic)
    data = json.dumps({"federation": fid, "round": r}).encode()
    svc.publisher.publish(topic, data, federation=fid, round=str(r)).result(timeout=30)


def get_documents(svc: Services, *refs: firestore.DocumentReference) -> list[firestore.DocumentSnapshot]:
    """Several documents in one round trip, in the order asked."""
    by_path = {snap.reference.path: snap for snap in svc.db.get_all(list(refs))}
    return [by_path[ref.path] for ref in refs]


def _round_parts(svc: Services, fid: str, r: int) -> tuple[firestore.CollectionReference, firestore.CollectionReference, firestore.DocumentReference]:
    """A round's update documents (one per node), late updates, and its close marker."""
    ref = round_ref(svc, fid, r)
    return ref.collection("updates"), ref.collection("late"), ref.collection("outcome").document("close")


def record_update(svc: Services, obj: RawObject, fid: str, r: int, node: str, attempt: int, now: datetime) -> str:
    """Count a node's update once in its round; an update after the round closed is refused as late.

    Each node's update is its own document, created once (a duplicate event finds it
    there), so nodes reporting together never contend for one document. The claims an
    upload carries (example count, metrics) and its size are checked before its bytes
    are read: an upload too big for any update is never downloaded, and one bigger than
    EAGER_DOWNLOAD_BYTES only once its size matches the federation's model.
    """
    updates, late, marker = _round_parts(svc, fid, r)
    examples, metrics, problem = _read_claims(obj.metadata)

    def download() -> bytes | None:
        try:
            return svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        except (NotFound, PreconditionFailed):
            return None

    def documents() -> list[firestore.DocumentSnapshot]:
        return get_documents(
            svc, round_ref(svc, fid, r), updates.document(node), marker, fed_ref(svc, fid), node_keys.node_ref(svc.db, svc.settings, node)
        )

    # Every round's critical path: the reads go out together, the documents in one batched get.
    eager = problem is None and 0 <= obj.size <= EAGER_DOWNLOAD_BYTES
    data, (round_snap, counted, closed, fed_snap, key_snap) = parallel(download, documents) if eager else (None, documents())
    if eager and data is None:
        return "ignored: the update is gone"  # deleted or replaced since; a replacement has its own event
    update = {
        "node": node, "object": f"gs://{obj.bucket}/{obj.name}", "generation": obj.generation, "attempt": attempt,
        "examples": examples, "metrics": metrics, "at": now,
    }
    round_doc = round_snap.to_dict()
    if round_doc is None or not fed_snap.exists:
        return "refused: unknown round"
    if node not in round_doc["expected"]:
        return f"refused: {node} is not in federation {fid}"
    fed = fed_snap.to_dict()
    problem = problem or _size_problem(fed, round_doc, obj.size)
    if problem is None and data is None:
        if (data := download()) is None:
            return "ignored: the update is gone"
    if problem := (
        problem or _unsigned(fed, fid, r, node, attempt, update, data, obj.metadata, key_snap) or _invalid_update(fed, round_doc, data, update)
    ):
        late.document(f"{node}-a{attempt}").set({**update, "refused": problem})
        log.error("update %s refused: %s", obj.name, problem)
        return f"refused: {problem}"  # recorded, never counted: it could not be aggregated

    def refuse_late() -> str:
        late.document(f"{node}-a{attempt}").set(update)
        return f"late: round {r} is closed"

    if counted.exists and (counted.get("object"), counted.get("generation")) == (update["object"], update["generation"]):
        return f"duplicate; {advance(svc, fid, r, now)}"  # the same upload delivered again
    if counted.exists and counted.get("object") == update["object"]:
        late.document(f"{node}-a{attempt}").set({**update, "refused": "replaces an update already counted"})
        return "refused: replaces an update already counted"  # the counted version is the one aggregated
    if round_doc["status"] != RoundStatus.OPEN or closed.exists:
        return refuse_late()
    try:
        updates.document(node).create(update)
    except AlreadyExists:
        return f"duplicate; {advance(svc, fid, r, now)}"
    if round_doc["kind"] == "train":
        VERIFIED.put(update["object"], obj.generation, data)  # the closing delivery aggregates it without a download
    outcome, closing = _advance(svc, fid, r, now, seen=(fed_snap, round_doc))
    if closing is not None and node not in closing["participants"]:
        return refuse_late()  # the round was closed without us between our checks and our write
    return f"recorded; {outcome}"


REQUIRED_METRICS = {"global_accuracy", "global_loss", "test_examples"}
MAX_METRICS_CHARS = 4096  # the metrics metadata a worker writes is about 200 characters
MAX_EXAMPLES = 10**9  # any node's examples, where the federation document predates per-node row counts
EAGER_DOWNLOAD_BYTES = 8 * 2**20  # an upload up to this size downloads alongside the document reads
HEADER_ALLOWANCE = 64 * 2**10  # safetensors header (tensor names, offsets, metadata) on top of the tensors
MAX_EVALUATION_BYTES = 64 * 2**10  # an evaluate round's upload is its metrics as JSON
_COUNT = re.compile(r"[0-9]{1,19}\Z")


class UpdateMetrics(BaseModel):
    """The metrics an update may carry; anything else, or any value out of range, refuses it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)

    global_accuracy: float = Field(ge=0, le=1)
    global_loss: float = Field(ge=0, le=1e6)
    test_examples: int = Field(ge=1, le=MAX_EXAMPLES)
    train_accuracy: float | None = Field(default=None, ge=0, le=1)
    train_loss: float | None = Field(default=None, ge=0, le=1e6)
    compute_s: float | None = Field(default=None, ge=0, le=1e6)


def _read_claims(metadata: dict[str, str]) -> tuple[int | None, dict | None, str | None]:
    """The example count and metrics an upload claims, and why they are unusable (None if they are not).

    Checked before anything is read: bounded in size, typed and in range. Reasons never
    quote the values, and refused claims are not recorded (None in their place).
    """
    examples_text, metrics_text = metadata.get("examples"), metadata.get("metrics")
    if not isinstance(examples_text, str) or not isinstance(metrics_text, str):
        return None, None, "no examples/metrics metadata"
    if not _COUNT.match(examples_text) or not 1 <= int(examples_text) <= MAX_EXAMPLES:
        return None, None, f"examples must be a whole number from 1 to {MAX_EXAMPLES}"
    if len(metrics_text) > MAX_METRICS_CHARS:
        return None, None, f"metrics metadata exceeds {MAX_METRICS_CHARS} characters"
    try:
        metrics = json.loads(metrics_text)
    except (ValueError, RecursionError):
        return None, None, "metrics metadata is not JSON"
    if not isinstance(metrics, dict):
        return None, None, "metrics metadata is not a JSON object"
    missing = REQUIRED_METRICS - metrics.keys()
    if missing:
        return None, None, f"metrics lack {sorted(missing)}"
    try:
        UpdateMetrics.model_validate(metrics)
    except ValidationError as exc:
        fields = sorted({str(e["loc"][0]) if e["loc"] and e["loc"][0] in UpdateMetrics.model_fields else "an unknown metric" for e in exc.errors()})
        return None, None, f"metrics out of range or of the wrong type: {', '.join(fields)}"
    return int(examples_text), metrics, None


def _size_problem(fed: dict, round_doc: dict, size: int) -> str | None:
    """Why an upload of `size` bytes cannot be this round's update (checked before it is downloaded).

    Only an upload bigger than the round's update is refused here; a smaller one is read (it
    is small) and refused by the tensor check, which says what is wrong with it.
    """
    if round_doc["kind"] != "train":
        limit = MAX_EVALUATION_BYTES
    else:
        limit = HEADER_ALLOWANCE + sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in _param_spec(fed).values())
    if not 0 < size <= limit:
        return f"the upload's size is not that of this round's update (at most {limit} bytes)"
    return None


def _node_rows(fed: dict, node: str) -> int:
    """The most examples `node` can have: its data set's rows when the federation started."""
    rows = (fed.get("node_rows") or {}).get(node)
    if rows is None:
        rows = (fed.get("stats") or {}).get("count")  # every node's rows together: older federation documents
    return min(int(rows), MAX_EXAMPLES) if isinstance(rows, int) else MAX_EXAMPLES


def _unsigned(
    fed: dict, fid: str, r: int, node: str, attempt: int, update: dict, data: bytes, metadata: dict, key_snap: firestore.DocumentSnapshot
) -> str | None:
    """Why the update's signature does not admit it (None if it does, or the federation takes unsigned updates).

    The signature covers the weights and the claims the hub acts on (example count,
    metrics, round, node, attempt), and is checked against the node's registered key,
    never a key the upload names.
    """
    if not fed["config"].get("signed_updates", False):  # configs from before signing lack the field
        return None
    if not key_snap.exists:
        return f"node {node} has no registered signing key"
    try:
        signed = signing.read_metadata(metadata)
        claims = signing.update_claims(
            federation=fid, round=r, node=node, attempt=attempt, examples=update["examples"], metrics=update["metrics"], payload=data
        )
    except (TypeError, ValueError) as exc:
        return f"unverifiable update: {exc}"
    if signed is None:
        return "unsigned update"
    if not signing.verify(key_snap.get("public_key"), claims, signed[1]):
        return f"bad signature: not signed with {node}'s registered key"
    return None


def _invalid_update(fed: dict, round_doc: dict, data: bytes, update: dict) -> str | None:
    """Why this update could not be aggregated (claims beyond the node's data, wrong or non-finite tensors), or None.

    Checked before the update is counted, so a bad upload can never leave a round
    closed-but-unfinishable. The claims were parsed and typed by _read_claims.
    """
    metrics = update["metrics"]
    if round_doc["kind"] == "train" and (metrics.get("train_loss") is None or metrics.get("train_accuracy") is None):
        return f"metrics lack {sorted({'train_loss', 'train_accuracy'} - {k for k, v in metrics.items() if v is not None})}"
    rows = _node_rows(fed, update["node"])
    if update["examples"] > rows or metrics["test_examples"] > rows:
        return f"examples claimed exceed the {rows} rows of {update['node']}'s data set"
    if round_doc["kind"] != "train":
        return None
    try:
        params, _ = weights.from_bytes(data, expected=_param_spec(fed))
    except weights.WeightsMismatch as exc:
        return str(exc)
    if not all(np.isfinite(p).all() for p in params.values()):
        return "weights contain NaN or infinite values"
    return None


def _param_spec(fed: dict) -> dict:
    config = FederationConfig.model_validate(fed["config"])
    return param_spec(config.model, fed["n_features"], fed["num_classes"], config.hidden)


class VerifiedUpdates:
    """Updates this hub instance read and counted, held for their round's aggregation.

    Without it the delivery that closes a round downloads again every update the
    instance already read and verified. An entry is keyed by object and generation, and a
    generation's bytes never change, so it is exactly what that download would return
    (the version whose signature was verified). Bounded, oldest out first; a miss (an
    update counted by another instance, or evicted) is downloaded as before. Thread-safe:
    one instance handles concurrent deliveries.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, uri: str, generation: int, data: bytes) -> None:
        with self._lock:
            if (uri, generation) in self._held or len(data) > self.max_bytes:
                return
            self._held[(uri, generation)] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                self._size -= len(self._held.popitem(last=False)[1])

    def pop(self, uri: str, generation: int) -> bytes | None:
        with self._lock:
            data = self._held.pop((uri, generation), None)
            self._size -= len(data) if data is not None else 0
            return data


VERIFIED = VerifiedUpdates(max_bytes=64 * 2**20)


def aggregate(svc: Services, fed: dict, r: int, participants: dict[str, dict], recover: bool) -> str:
    """The global model after training round r, written once to a fixed path; returns its URI.

    Updates this instance counted come from VERIFIED, the others are read here. Only a
    recovering closer can find the model written already (by the closer that died after
    writing it).
    """
    config = FederationConfig.model_validate(fed["config"])
    fid = config.id
    hub = svc.gcs.bucket(svc.settings.hub_bucket)
    target = hub.blob(global_model_object(fid, r))
    uri = f"gs://{hub.name}/{target.name}"
    if recover and target.exists():
        return uri  # same inputs, same bytes
    expected = _param_spec(fed)
    nodes = sorted(participants)

    def fetch(i: int):
        # The very version whose signature was verified when it was counted.
        update = participants[nodes[i]]
        return IO.submit(lambda: VERIFIED.pop(update["object"], update["generation"]) or gcs_uri.read(svc.gcs, update["object"], update["generation"]))

    def updates():
        """Each update as the accumulator asks for it, the next one already downloading."""
        pending = fetch(0)
        for i, node in enumerate(nodes):
            data = pending.result()
            if i + 1 < len(nodes):
                pending = fetch(i + 1)
            params, _ = weights.from_bytes(data, expected=expected)
            del data
            yield params, float(participants[node]["examples"])
            del params

    # Memory stays a few models however many nodes report: the accumulator holds at most a
    # bounded group of updates at a time (shared/aggregation.py).
    acc = StreamingMean()
    acc.extend(updates())
    averaged = acc.result()
    new_global = averaged
    if config.strategy in ("fedadam", "fedyogi") and r > 1:
        # Round 1 has no previous global model at the hub (nodes start from the shared seed),
        # so the server optimizer steps from round 2 on.
        previous, _ = weights.from_bytes(gcs_uri.read(svc.gcs, fed["global_model_uri"]), expected=expected)
        state_blob = hub.blob(server_state_object(fid, r - 1))
        state = weights.from_bytes(state_blob.download_as_bytes())[0] if state_blob.exists() else None
        optimizer = ServerOptimizer(config.strategy, server_lr=config.server_lr)
        new_global, state = optimizer.step(previous, averaged, state)
        _create(hub.blob(server_state_object(fid, r)), weights.to_bytes(state, {"federation": fid, "round": str(r)}))
    _create(target, weights.to_bytes(new_global, {"federation": fid, "round": str(r)}))
    return uri


def _create(blob, data: bytes) -> None:
    """Write once: a recovering closer racing the original one never replaces what it wrote."""
    try:
        blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0)
    except PreconditionFailed:
        pass


STALE_CLOSE_S = 15.0  # a close marker this old on a still-open round: its finisher died (or is slow: writes are create-only)
CLOSE_GIVE_UP_S = 600.0  # a close that keeps failing this long (e.g. an update deleted) fails the federation


def advance(svc: Services, fid: str, r: int, now: datetime, recover: bool = False) -> str:
    """Close round r if it may close now, then open round r+1 or complete the federation.

    The caller that creates the round's close marker (which fixes the participants)
    finishes the close; everyone else leaves it alone, so one delivery aggregates and
    nobody contends for the federation document. If that finisher died, the deadline
    sweep (`recover=True`) finishes from the marker once it is STALE_CLOSE_S old.
    Every finishing write is idempotent, and the federation moves from round r to
    r+1 once (one atomic write, guarded by the federation document's update time).
    """
    return _advance(svc, fid, r, now, recover=recover)[0]


def _advance(
    svc: Services, fid: str, r: int, now: datetime, recover: bool = False, seen: tuple[firestore.DocumentSnapshot, dict] | None = None
) -> tuple[str, dict | None]:
    """`advance`, also returning the round's close marker when there is one (who is in the round).

    `seen` is the federation snapshot and the round document that a delivery read before it
    counted its update, when the round had no close marker. Neither changes until a marker
    exists, so only the marker and the expected nodes' reports are read again, in one batched
    get: one round trip fewer for every update. Should a marker appear meanwhile, the reads
    after it or the failed create of ours say who is in the round.
    """
    updates, _, marker = _round_parts(svc, fid, r)
    if seen is None:
        (fed_snap, marker_snap, round_snap), reported_snaps = parallel(
            lambda: get_documents(svc, fed_ref(svc, fid), marker, round_ref(svc, fid, r)), lambda: list(updates.stream())
        )
        round_doc = round_snap.to_dict()
    else:
        fed_snap, round_doc = seen
        marker_snap, *reported_snaps = get_documents(svc, marker, *(updates.document(n) for n in round_doc["expected"]))
    fed, closing = fed_snap.to_dict(), marker_snap.to_dict()
    if not fed or not round_doc or fed.get("status") != "running" or fed.get("round") != r:
        return "nothing to do", closing
    config = FederationConfig.model_validate(fed["config"])
    if closing is not None:
        age_s = (now - closing["at"]).total_seconds()
        if recover and age_s >= STALE_CLOSE_S:
            try:
                return _finish_close(svc, fed_snap, config, round_doc, closing, now, recover=True), closing
            except Exception as exc:
                if age_s < CLOSE_GIVE_UP_S:
                    raise  # the next sweep tries again
                log.exception("round %d of %s could not be closed for %.0f s; failing the federation", r, fid, age_s)
                failed = {**closing, "status": RoundStatus.FAILED.value, "reason": f"round {r} could not be closed: {exc}"}
                return _finish_close(svc, fed_snap, config, round_doc, failed, now, recover=True), closing
        return f"round {r} is being closed by another delivery", closing
    reported = {snap.id: snap.to_dict() for snap in reported_snaps if snap.exists}
    decision = close_decision(round_doc, list(reported), config.quorum, now)
    if decision is None:
        return f"round {r}: {len(reported)} of {len(round_doc['expected'])} reported", None
    status, reason = decision
    closing = {"status": status.value, "reason": reason, "participants": sorted(reported), "at": now}
    try:
        marker.create(closing)
    except AlreadyExists:
        return f"round {r} is being closed by another delivery", marker.get().to_dict()
    return _finish_close(svc, fed_snap, config, round_doc, closing, now, reported), closing


def _finish_close(
    svc: Services, fed_snap: firestore.DocumentSnapshot, config: FederationConfig, round_doc: dict, closing: dict, now: datetime,
    reported: dict | None = None, recover: bool = False,
) -> str:
    fid, r, fed = config.id, round_doc["round"], fed_snap.to_dict()
    if reported is None:
        updates, _, _ = _round_parts(svc, fid, r)
        reported = {node: updates.document(node).get().to_dict() for node in closing["participants"]}
    participants = {node: reported[node] for node in closing["participants"]}
    status, training = RoundStatus(closing["status"]), round_doc["kind"] == "train"
    round_update: dict = {"status": status.value, "closed_at": closing["at"], "reason": closing["reason"], "participants": closing["participants"]}
    fed_update: dict = {"updated_at": now}
    if status is RoundStatus.FAILED:
        fed_update |= {"status": "failed", "error": closing["reason"]}
    else:
        # Each node evaluated the model it received: the global model after round r-1.
        round_update["global_metrics"] = {"round": r - 1, **weighted_metrics(participants, "global_")}
        if training:
            round_update["train_metrics"] = weighted_metrics(participants, "train_")
            fed_update |= {"round": r + 1, "global_model_uri": aggregate(svc, fed, r, participants, recover)}
        else:
            fed_update |= {"status": "completed", "final": round_update["global_metrics"], "completed_at": now}

    # One atomic write moves the federation on, guarded by the federation document being
    # as we read it: a finisher that lost a race (or a recovery after the finisher came
    # back) changes nothing.
    batch = svc.db.batch()
    batch.update(round_ref(svc, fid, r), round_update)
    if status is RoundStatus.CLOSED and training:
        batch.create(round_ref(svc, fid, r + 1), new_round(config, r + 1, now))
    batch.update(fed_ref(svc, fid), fed_update, option=svc.db.write_option(last_update_time=fed_snap.update_time))
    try:
        batch.commit()
    except (AlreadyExists, FailedPrecondition):
        return f"round {r} already closed"
    # Should we die before broadcasting, workers still see round r+1 in the federation document.
    if status is RoundStatus.FAILED:
        return f"federation failed: {closing['reason']}"
    if training:
        broadcast(svc, fid, r + 1)
        return f"round {r} closed ({closing['reason']}); round {r + 1} broadcast"
    return f"federation completed ({closing['reason']})"


def sweep_deadlines(svc: Services, now: datetime) -> list[str]:
    """Close rounds whose deadline passed (with quorum) or fail them; run periodically."""
    running = svc.db.collection(svc.settings.federations_collection).where(filter=firestore.FieldFilter("status", "==", "running")).stream()
    outcomes = []
    for snap in running:
        try:
            outcomes.append(f"{snap.id}: {advance(svc, snap.id, snap.get('round'), now, recover=True)}")
        except Exception as exc:  # one federation's trouble must not stall every other's clock
            log.exception("deadline sweep of %s failed", snap.id)
            outcomes.append(f"{snap.id}: sweep failed: {exc}")
    return outcomes
