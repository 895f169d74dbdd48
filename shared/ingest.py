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
from shared.datasetstore import (
    FILE_DONE,
    Dataset,
    DatasetStore,
    FileRecord,
    FileStatus,
    FirestoreDatasetStore,
    check_file_transition,
    declared,
)
from shared.envelope import Envelope, Purpose, node_kek
from shared.jobs import Job
from shared.jobstore import JobStore
from shared.manifest import ShardReady, complete_if_ready, processed_prefix
from shared.preprocess import RejectedFile, preprocess_file
from shared.quarantine import MAX_PROBLEMS, QuarantineRecord, QuarantineStore, copy_name, object_source

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
    datasets: DatasetStore | None = None  # default: the Firestore store over `db`

    def __post_init__(self) -> None:
        if self.datasets is None:
            self.datasets = FirestoreDatasetStore(self.db, self.settings)

    def create_job(self, job: Job) -> bool:
        return JobStore(self.db, self.settings).create(job)


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
    svc.datasets.update_dataset(node, dataset, lambda current: declared(current, node, dataset, spec, obj.generation, now))
    # A retried delivery (the same declaration held) still runs the catch-up: the first try may
    # have stored the declaration and then failed on a waiting file.
    if svc.datasets.dataset(node, dataset).spec_generation > obj.generation:
        return "stale: a newer declaration is stored"
    waiting = [(b, parts[1]) for b in svc.gcs.list_blobs(obj.bucket, prefix=f"{dataset}/") if b.name != obj.name and (parts := split_object_name(b.name))]
    for blob, file_name in waiting:
        process_data_file(svc, node, dataset, file_name, RawObject(obj.bucket, blob.name, blob.generation, blob.size), event_id, now)
    # A re-declaration of files that are all in already gets no new shard-ready message.
    complete_if_ready(svc.datasets, svc.create_job, node, dataset, now)
    return f"declaration stored; {len(waiting)} earlier file(s) processed"


class Claim(StrEnum):
    """What a delivery may do with one upload of a file (see `claim_decision`)."""

    CLAIMED = "claimed"  # this delivery processes it
    AWAITING_DECLARATION = "awaiting_declaration"  # recorded; the declaration's arrival processes it
    DUPLICATE = "duplicate"  # handled already, by another delivery
    BUSY = "busy"  # another delivery holds a live claim on it
    STALE = "stale"  # a newer upload of the file was handled


CLAIM_LEASE_S = 600.0  # longer than any function's timeout: a claim this old was left by a delivery that died for good


def claim_decision(record: FileRecord | None, generation: int, spec_generation: int | None, claimant: str, now: datetime) -> Claim:
    """Pure: may the delivery `claimant` process this upload, given the file's record?

    A claimed upload's record goes processing -> publishing -> processed (or quarantined),
    along FILE_TRANSITIONS. The claimant may take its own unfinished claim back: it is a
    retry of the same event, whose first try may have died anywhere before the end.
    Anyone else leaves a live claim alone and takes over one that has outlived CLAIM_LEASE_S.
    """
    if record is not None and record.generation > generation:
        return Claim.STALE
    if spec_generation is None:
        return Claim.AWAITING_DECLARATION
    if record is None or (record.generation, record.spec_generation) != (generation, spec_generation):
        return Claim.CLAIMED  # a new upload or declaration
    if record.status in FILE_DONE:
        return Claim.DUPLICATE
    live = record.status is not FileStatus.AWAITING_DECLARATION and (now - record.claimed_at).total_seconds() < CLAIM_LEASE_S
    return Claim.BUSY if live and record.claimed_by != claimant else Claim.CLAIMED


def claimed(record: FileRecord | None, name: str, generation: int, spec_generation: int | None, claimant: str, now: datetime) -> FileRecord:
    """Pure: the record of a claim (`claim_decision` said CLAIMED or AWAITING_DECLARATION); what an older claim held is dropped."""
    status = FileStatus.AWAITING_DECLARATION if spec_generation is None else FileStatus.PROCESSING
    check_file_transition(record.status if record else None, status)
    if status is FileStatus.AWAITING_DECLARATION:
        return FileRecord(name=name, generation=generation, status=status, updated_at=now)
    return FileRecord(name=name, generation=generation, spec_generation=spec_generation, status=status, claimed_by=claimant,
                      claimed_at=now, updated_at=now)


def process_data_file(svc: Services, node: str, dataset: str, file_name: str, obj: RawObject, claimant: str, now: datetime) -> str:
    decision, ds = Claim.STALE, None

    def claim(record: FileRecord | None, current: Dataset | None) -> FileRecord | None:
        nonlocal decision, ds
        ds, spec_generation = current, current.spec_generation if current else None
        decision = claim_decision(record, obj.generation, spec_generation, claimant, now)
        if decision in (Claim.CLAIMED, Claim.AWAITING_DECLARATION):
            return claimed(record, file_name, obj.generation, spec_generation, claimant, now)
        return None

    svc.datasets.update_file(node, dataset, file_name, claim)
    if decision is not Claim.CLAIMED:
        return f"{decision.value}: gs://{obj.bucket}/{obj.name}#{obj.generation}"
    spec, spec_generation = ds.spec, ds.spec_generation
    mine = Mine(node, dataset, file_name, obj.generation, spec_generation, claimant)
    try:
        if file_name not in spec.expected_files:
            raise RejectedFile("unexpected_file", f"not in expected_files of {dataset}/{SPEC_OBJECT}")
        if obj.size > svc.settings.max_upload_bytes:
            raise RejectedFile("too_large", f"{obj.size} bytes exceeds the limit of {svc.settings.max_upload_bytes}")
        data = svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        processed = preprocess_file(data, file_name, spec, svc.settings.max_upload_bytes)
    except RejectedFile as rejected:
        quarantine(svc, node, obj, dataset, rejected, now)
        _finish(svc, mine, FileStatus.QUARANTINED, now, reason=str(rejected))
        return f"quarantined: {rejected.reason}"

    out_bucket = svc.gcs.bucket(svc.settings.processed_bucket(node))
    prefix = processed_prefix(dataset, file_name, obj.generation, spec_generation)
    shard_uris = []
    envelope = Envelope(node_kek(svc.settings, node))  # sealed under the node's key: only its attested workers open them
    for i, shard in enumerate(processed.shards):
        name = f"{prefix}/shard-{i:05d}.parquet"
        sealed = envelope.seal(shard, out_bucket.name, name, Purpose.SHARD)
        out_bucket.blob(name).upload_from_string(sealed, content_type="application/octet-stream")
        shard_uris.append(f"gs://{out_bucket.name}/{name}")
    ready = ShardReady(
        node=node, dataset=dataset, file=file_name, generation=obj.generation, spec_generation=spec_generation,
        source=f"gs://{obj.bucket}/{obj.name}", rows=processed.rows, shards=shard_uris, stats=processed.stats,
    )
    out_bucket.blob(f"{prefix}/manifest.json").upload_from_string(ready.model_dump_json(indent=2), content_type="application/json")
    message = ready.model_dump_json().encode()
    # The record holds the message's digest before it is published: shard-ready accepts only
    # the message ingest wrote (shared.manifest.shard_ready_problem), not one made up by a publisher.
    digest = hashlib.sha256(message).hexdigest()
    if not _finish(svc, mine, FileStatus.PUBLISHING, now, rows=processed.rows, shards=len(shard_uris), manifest_sha256=digest):
        return "superseded: a newer upload or declaration took over while this one was processed"
    topic = svc.publisher.topic_path(svc.settings.project, svc.settings.shard_ready_topic)
    svc.publisher.publish(topic, message, node=node, dataset=dataset).result(timeout=30)
    _finish(svc, mine, FileStatus.PROCESSED, now)
    return f"processed: {processed.rows} rows in {len(shard_uris)} shard(s)"


@dataclass(frozen=True)
class Mine:
    """One delivery's claim on one upload: whose record `_finish` may move."""

    node: str
    dataset: str
    file_name: str
    generation: int
    spec_generation: int
    claimant: str

    def holds(self, record: FileRecord | None) -> bool:
        return record is not None and (record.generation, record.spec_generation, record.claimed_by) == (
            self.generation, self.spec_generation, self.claimant)


def _finish(svc: Services, mine: Mine, target: FileStatus, now: datetime, **fields: object) -> bool:
    """Move a claimed upload's record on, unless a newer upload or declaration has taken the record since."""
    written = svc.datasets.update_file(
        mine.node, mine.dataset, mine.file_name, lambda record, _ds: record.moved(target, now, **fields) if mine.holds(record) else None,
    )
    return written is not None


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
        node=node, dataset=dataset, source=object_source(obj.bucket, obj.name), generation=obj.generation,
        reason=rejected.reason, detail=rejected.detail, problems=rejected.problems[:MAX_PROBLEMS], kept_at=copied, at=now,
    ))


def refuse_undecodable(svc: Services, bucket: str, event_id: str, now: datetime) -> str:
    """Record an event whose object cannot even be decoded (a name that is not UTF-8): no retry can fix it.

    Nothing can be copied, as the object has no usable name; the record is keyed by the
    event, so a redelivery overwrites it.
    """
    node = svc.settings.node_of_bucket(bucket)
    if node is None:
        return f"ignored: {bucket} is not a raw bucket"
    QuarantineStore(svc.db, svc.settings).put(QuarantineRecord(
        node=node, source=f"gs://{bucket}/?event={event_id[:200]}", reason="bad_event",
        detail="the event's object could not be decoded (its name is not valid UTF-8, or the event is malformed)", at=now,
    ))
    return "quarantined: bad_event"


def _errors(exc: ValidationError) -> list[str]:
    """Each validation error on its own line: where, and what is wrong (never the input's value)."""
    return [f"{'.'.join(str(p) for p in err.get('loc', ())) or 'document'}: {err['msg']}" for err in exc.errors()]
