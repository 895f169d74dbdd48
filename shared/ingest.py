"""What happens when a file lands in a node's raw bucket.

`handle_raw_object` is the whole story: the data set's declaration is read, the file
is validated and cut into shards in the node's processed bucket, a manifest entry is
written next to them, and a shard-ready message is published. A bad file is copied
to the node's quarantine bucket with its reason recorded in Firestore; it is never
retried. Raw data never leaves the node's own buckets.

Every step is keyed by the object's generation. A delivery first claims the
(object, generation, declaration) in a transaction, so concurrent duplicate events do
the work and publish once; a late event for an older upload does nothing; and a
retry of the claiming event after a crash takes its claim back and rewrites the same
bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from google.cloud import firestore, pubsub_v1, storage
from pydantic import ValidationError

from shared.config import Settings
from shared.datasets import MAX_SPEC_BYTES, SPEC_OBJECT, DatasetSpec, split_object_name
from shared.manifest import ShardReady, complete_if_ready, dataset_ref, file_ref, processed_prefix
from shared.preprocess import RejectedFile, preprocess_file
from shared.quarantine import MAX_PROBLEMS, QuarantineRecord, QuarantineStore, copy_name

log = logging.getLogger("fedpipe.ingest")


@dataclass(frozen=True)
class RawObject:
    bucket: str
    name: str
    generation: int
    size: int
    metadata: dict[str, str] = field(default_factory=dict)  # the object's custom metadata, as the event carries it


@dataclass
class Services:
    settings: Settings
    db: firestore.Client
    gcs: storage.Client
    publisher: pubsub_v1.PublisherClient


def handle_raw_object(svc: Services, obj: RawObject, event_id: str, now: datetime) -> str:
    """Process one finalized raw object; returns what happened, for the log.

    `event_id` is the CloudEvent's id: a retry of this delivery carries it again and may
    take back the claim this one made.
    """
    node = svc.settings.node_of_bucket(obj.bucket)
    if node is None:
        return f"ignored: {obj.bucket} is not a raw bucket"
    parts = split_object_name(obj.name)
    if parts is None:
        detail = "not '<dataset>/<file>' with a plain data set name and a file name Cloud Storage allows directly under it"
        quarantine(svc, node, obj, None, RejectedFile("bad_path", detail), now)
        return "quarantined: bad_path"
    dataset, file_name = parts
    if file_name == SPEC_OBJECT:
        return _accept_spec(svc, node, dataset, obj, event_id, now)
    return process_data_file(svc, node, dataset, file_name, obj, event_id, now)


def _accept_spec(svc: Services, node: str, dataset: str, obj: RawObject, event_id: str, now: datetime) -> str:
    """Store the declaration, then process data files that arrived before it."""
    try:
        if obj.size > MAX_SPEC_BYTES:
            raise RejectedFile("too_large", f"a declaration of {obj.size} bytes exceeds the limit of {MAX_SPEC_BYTES}")
        data = svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        try:
            spec = DatasetSpec.model_validate_json(data, context={"dataset": dataset})
        except ValidationError as exc:
            problems = _errors(exc)
            raise RejectedFile("bad_spec", "; ".join(problems), problems) from None
    except RejectedFile as rejected:
        quarantine(svc, node, obj, dataset, rejected, now)
        return f"quarantined: {rejected.reason}"
    ref = dataset_ref(svc.db, svc.settings, node, dataset)

    @firestore.transactional
    def store(transaction: firestore.Transaction) -> bool:
        """False only for an older declaration arriving late; the same one again catches up below."""
        current = (ref.get(transaction=transaction).to_dict() or {})
        held = current.get("spec_generation", 0)
        if held > obj.generation:
            return False
        if held < obj.generation:
            # A new declaration starts collecting again; its files may already all be in (checked below).
            base = {"node": node, "dataset": dataset, "files": {}, "created_at": now}
            transaction.set(ref, {
                **base, **current, "status": "collecting", "spec": spec.model_dump(mode="json"),
                "spec_generation": obj.generation, "updated_at": now,
            })
        return True

    # A retried delivery (held == generation) still runs the catch-up: the first try may
    # have stored the declaration and then failed on a waiting file.
    if not store(svc.db.transaction()):
        return "stale: a newer declaration is stored"
    waiting = [(b, parts[1]) for b in svc.gcs.list_blobs(obj.bucket, prefix=f"{dataset}/") if b.name != obj.name and (parts := split_object_name(b.name))]
    for blob, file_name in waiting:
        process_data_file(svc, node, dataset, file_name, RawObject(obj.bucket, blob.name, blob.generation, blob.size), event_id, now)
    # A re-declaration of files that are all in already gets no new shard-ready message.
    complete_if_ready(svc.db, svc.settings, ref, now)
    return f"declaration stored; {len(waiting)} earlier file(s) processed"


class Claim(StrEnum):
    """What a delivery may do with one upload of a file (see `claim_decision`)."""

    CLAIMED = "claimed"  # this delivery processes it
    AWAITING_DECLARATION = "awaiting_declaration"  # recorded; the declaration's arrival processes it
    DUPLICATE = "duplicate"  # handled already, by another delivery
    BUSY = "busy"  # another delivery holds a live claim on it
    STALE = "stale"  # a newer upload of the file was handled


CLAIM_LEASE_S = 600.0  # longer than any function's timeout: a claim this old was left by a delivery that died for good


def claim_decision(record: dict, generation: int, spec_generation: int | None, claimant: str, now: datetime) -> Claim:
    """Pure: may the delivery `claimant` process this upload, given the file's record?

    An upload's record goes processing -> publishing -> processed (or quarantined).
    The claimant may take its own unfinished claim back: it is a retry of the same
    event, whose first try may have died anywhere before the end. Anyone else leaves a
    live claim alone and takes over one that has outlived CLAIM_LEASE_S.
    """
    if record.get("generation", 0) > generation:
        return Claim.STALE
    if spec_generation is None:
        return Claim.AWAITING_DECLARATION
    if (record.get("generation"), record.get("spec_generation")) != (generation, spec_generation):
        return Claim.CLAIMED
    if record.get("status") in ("processed", "quarantined"):
        return Claim.DUPLICATE
    live = record.get("status") in ("processing", "publishing") and (now - record["claimed_at"]).total_seconds() < CLAIM_LEASE_S
    return Claim.BUSY if live and record.get("claimed_by") != claimant else Claim.CLAIMED


def process_data_file(svc: Services, node: str, dataset: str, file_name: str, obj: RawObject, claimant: str, now: datetime) -> str:
    record_ref, ds_ref = file_ref(svc.db, svc.settings, node, dataset, file_name), dataset_ref(svc.db, svc.settings, node, dataset)
    identity = {"name": file_name, "generation": obj.generation}

    @firestore.transactional
    def claim(transaction: firestore.Transaction) -> tuple[Claim, dict]:
        record = record_ref.get(transaction=transaction).to_dict() or {}
        ds = ds_ref.get(transaction=transaction).to_dict()
        spec_generation = None if ds is None else ds.get("spec_generation")
        decision = claim_decision(record, obj.generation, spec_generation, claimant, now)
        if decision is Claim.CLAIMED:
            transaction.set(record_ref, {
                **identity, "spec_generation": spec_generation, "status": "processing", "claimed_by": claimant, "claimed_at": now, "updated_at": now,
            })
        elif decision is Claim.AWAITING_DECLARATION:
            transaction.set(record_ref, {**identity, "status": "awaiting_declaration", "updated_at": now})
        return decision, ds or {}

    decision, ds = claim(svc.db.transaction())
    if decision is not Claim.CLAIMED:
        return f"{decision.value}: gs://{obj.bucket}/{obj.name}#{obj.generation}"
    spec, spec_generation = DatasetSpec.model_validate(ds["spec"]), ds.get("spec_generation")
    mine = {**identity, "spec_generation": spec_generation, "claimed_by": claimant}
    try:
        if file_name not in spec.expected_files:
            raise RejectedFile("unexpected_file", f"not in expected_files of {dataset}/{SPEC_OBJECT}")
        if obj.size > svc.settings.max_upload_bytes:
            raise RejectedFile("too_large", f"{obj.size} bytes exceeds the limit of {svc.settings.max_upload_bytes}")
        data = svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        processed = preprocess_file(data, file_name, spec, svc.settings.max_upload_bytes)
    except RejectedFile as rejected:
        quarantine(svc, node, obj, dataset, rejected, now)
        _finish(svc, record_ref, mine, {"status": "quarantined", "reason": str(rejected), "updated_at": now})
        return f"quarantined: {rejected.reason}"

    out_bucket = svc.gcs.bucket(svc.settings.processed_bucket(node))
    prefix = processed_prefix(dataset, file_name, obj.generation, spec_generation)
    shard_uris = []
    for i, shard in enumerate(processed.shards):
        name = f"{prefix}/shard-{i:05d}.parquet"
        out_bucket.blob(name).upload_from_string(shard, content_type="application/vnd.apache.parquet")
        shard_uris.append(f"gs://{out_bucket.name}/{name}")
    ready = ShardReady(
        node=node, dataset=dataset, file=file_name, generation=obj.generation, spec_generation=spec_generation,
        source=f"gs://{obj.bucket}/{obj.name}", rows=processed.rows, shards=shard_uris, stats=processed.stats,
    )
    out_bucket.blob(f"{prefix}/manifest.json").upload_from_string(ready.model_dump_json(indent=2), content_type="application/json")
    message = ready.model_dump_json().encode()
    # The record holds the message's digest before it is published: shard-ready accepts only
    # the message ingest wrote (shared.manifest.shard_ready_problem), not one made up by a publisher.
    publishing = {"status": "publishing", "rows": processed.rows, "shards": len(shard_uris), "manifest_sha256": hashlib.sha256(message).hexdigest()}
    if not _finish(svc, record_ref, mine, {**publishing, "updated_at": now}):
        return "superseded: a newer upload or declaration took over while this one was processed"
    topic = svc.publisher.topic_path(svc.settings.project, svc.settings.shard_ready_topic)
    svc.publisher.publish(topic, message, node=node, dataset=dataset).result(timeout=30)
    _finish(svc, record_ref, mine, {"status": "processed", "updated_at": now})
    return f"processed: {processed.rows} rows in {len(shard_uris)} shard(s)"


def _finish(svc: Services, record_ref: firestore.DocumentReference, mine: dict, outcome: dict) -> bool:
    """Record how a claimed upload ended, unless a newer upload or declaration has taken the record since."""

    @firestore.transactional
    def write(transaction: firestore.Transaction) -> bool:
        record = record_ref.get(transaction=transaction).to_dict() or {}
        if any(record.get(k) != v for k, v in mine.items()):
            return False
        transaction.set(record_ref, {**record, **outcome})
        return True

    return write(svc.db.transaction())


def quarantine(svc: Services, node: str, obj: RawObject, dataset: str | None, rejected: RejectedFile, now: datetime) -> None:
    """Keep the bad file (copied, never lost) and record why, for `fedpipe quarantine`."""
    source_bucket = svc.gcs.bucket(obj.bucket)
    quarantine_bucket = svc.gcs.bucket(svc.settings.quarantine_bucket(node))
    target = copy_name(obj.name, obj.generation)
    try:
        source_bucket.copy_blob(source_bucket.blob(obj.name), quarantine_bucket, target, source_generation=obj.generation)
        copied = f"gs://{quarantine_bucket.name}/{target}"
    except Exception as exc:  # the object may already be gone (deleted or overwritten); the record must still land
        log.warning("could not copy an object of %s to quarantine: %s", obj.bucket, type(exc).__name__)
        copied = None
    QuarantineStore(svc.db, svc.settings).put(QuarantineRecord(
        node=node, dataset=dataset, source=f"gs://{obj.bucket}/{obj.name}", generation=obj.generation,
        reason=rejected.reason, detail=rejected.detail, problems=rejected.problems[:MAX_PROBLEMS], kept_at=copied, at=now,
    ))


def _errors(exc: ValidationError) -> list[str]:
    """Each validation error on its own line: where, and what is wrong (never the input's value)."""
    return [f"{'.'.join(str(p) for p in err.get('loc', ())) or 'document'}: {err['msg']}" for err in exc.errors()]
