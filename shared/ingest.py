"""What happens when a file lands in a node's raw bucket.

`handle_raw_object` is the whole story: the data set's declaration is read, the file
is validated and cut into shards in the node's processed bucket, a manifest entry is
written next to them, and a shard-ready message is published. A bad file is copied
to the node's quarantine bucket with its reason recorded in Firestore; it is never
retried. Raw data never leaves the node's own buckets.

Every step is keyed by the object's generation, so a duplicate or late event for the
same upload does nothing, and a retry after a crash rewrites the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from google.cloud import firestore, pubsub_v1, storage
from pydantic import ValidationError

from shared.config import Settings
from shared.datasets import SPEC_OBJECT, DatasetSpec, split_object_name
from shared.manifest import ShardReady, complete_if_ready, dataset_doc_id
from shared.preprocess import RejectedFile, preprocess_file

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


def handle_raw_object(svc: Services, obj: RawObject, now: datetime) -> str:
    """Process one finalized raw object; returns what happened, for the log."""
    node = svc.settings.node_of_bucket(obj.bucket)
    if node is None:
        return f"ignored: {obj.bucket} is not a raw bucket"
    parts = split_object_name(obj.name)
    if parts is None:
        quarantine(svc, node, obj, None, RejectedFile("bad_path", f"{obj.name!r} is not '<dataset>/<file>'"), now)
        return "quarantined: bad_path"
    dataset, file_name = parts
    if file_name == SPEC_OBJECT:
        return _accept_spec(svc, node, dataset, obj, now)
    return process_data_file(svc, node, dataset, file_name, obj, now)


def _files(svc: Services, node: str, dataset: str) -> firestore.CollectionReference:
    return svc.db.collection(svc.settings.datasets_collection).document(dataset_doc_id(node, dataset)).collection("files")


def _accept_spec(svc: Services, node: str, dataset: str, obj: RawObject, now: datetime) -> str:
    """Store the declaration, then process data files that arrived before it."""
    blob = svc.gcs.bucket(obj.bucket).blob(obj.name)
    try:
        spec = DatasetSpec.model_validate_json(blob.download_as_bytes(if_generation_match=obj.generation))
    except ValidationError as exc:
        quarantine(svc, node, obj, dataset, RejectedFile("bad_spec", _first_error(exc)), now)
        return "quarantined: bad_spec"
    ref = svc.db.collection(svc.settings.datasets_collection).document(dataset_doc_id(node, dataset))

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
    waiting = [
        b for b in svc.gcs.list_blobs(obj.bucket, prefix=f"{dataset}/")
        if b.name != obj.name and split_object_name(b.name)
    ]
    for blob in waiting:
        process_data_file(svc, node, dataset, blob.name.split("/", 1)[1], RawObject(obj.bucket, blob.name, blob.generation, blob.size), now)
    # A re-declaration of files that are all in already gets no new shard-ready message.
    complete_if_ready(svc.db, svc.settings, ref, now)
    return f"declaration stored; {len(waiting)} earlier file(s) processed"


def process_data_file(svc: Services, node: str, dataset: str, file_name: str, obj: RawObject, now: datetime) -> str:
    record_ref = _files(svc, node, dataset).document(file_name)
    record = record_ref.get().to_dict() or {}
    if record.get("generation", 0) > obj.generation:
        return "stale: a newer upload of this file was handled"
    ds = svc.db.collection(svc.settings.datasets_collection).document(dataset_doc_id(node, dataset)).get()
    if not ds.exists:
        record_ref.set({"generation": obj.generation, "status": "awaiting_declaration", "updated_at": now})
        return f"waiting: no {dataset}/{SPEC_OBJECT} yet"
    # A file is handled once per (upload, declaration): a new declaration processes it again.
    spec_generation = ds.get("spec_generation")
    if (record.get("generation"), record.get("spec_generation")) == (obj.generation, spec_generation) and record.get("status") in (
        "processed", "quarantined"
    ):
        return "duplicate: this upload was already handled"
    spec = DatasetSpec.model_validate(ds.to_dict()["spec"])
    try:
        if file_name not in spec.expected_files:
            raise RejectedFile("unexpected_file", f"{file_name!r} is not in expected_files of {dataset}/{SPEC_OBJECT}")
        if obj.size > svc.settings.max_upload_bytes:
            raise RejectedFile("too_large", f"{obj.size} bytes exceeds the limit of {svc.settings.max_upload_bytes}")
        data = svc.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
        processed = preprocess_file(data, file_name, spec, svc.settings.max_upload_bytes)
    except RejectedFile as rejected:
        quarantine(svc, node, obj, dataset, rejected, now)
        record_ref.set({"generation": obj.generation, "spec_generation": spec_generation, "status": "quarantined", "reason": str(rejected), "updated_at": now})
        return f"quarantined: {rejected}"

    out_bucket = svc.gcs.bucket(svc.settings.processed_bucket(node))
    prefix = f"{dataset}/{file_name}/g{obj.generation}-s{spec_generation}"
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
    topic = svc.publisher.topic_path(svc.settings.project, svc.settings.shard_ready_topic)
    svc.publisher.publish(topic, ready.model_dump_json().encode(), node=node, dataset=dataset).result(timeout=30)
    record_ref.set({
        "generation": obj.generation, "spec_generation": spec_generation, "status": "processed",
        "rows": processed.rows, "shards": len(shard_uris), "updated_at": now,
    })
    return f"processed: {processed.rows} rows in {len(shard_uris)} shard(s)"


def quarantine(svc: Services, node: str, obj: RawObject, dataset: str | None, rejected: RejectedFile, now: datetime) -> None:
    """Keep the bad file (copied, never lost) and record why, for `fedpipe quarantine list`."""
    target = f"{obj.name}#g{obj.generation}"
    source_bucket = svc.gcs.bucket(obj.bucket)
    quarantine_bucket = svc.gcs.bucket(svc.settings.quarantine_bucket(node))
    try:
        source_bucket.copy_blob(source_bucket.blob(obj.name), quarantine_bucket, target, source_generation=obj.generation)
        copied = f"gs://{quarantine_bucket.name}/{target}"
    except Exception as exc:  # the object may already be gone (deleted or overwritten); the record must still land
        log.warning("could not copy %s to quarantine: %s", obj.name, exc)
        copied = None
    doc_id = f"{node}~{obj.name}~g{obj.generation}".replace("/", "|")
    svc.db.collection(svc.settings.quarantine_collection).document(doc_id).set(
        {
            "node": node, "dataset": dataset, "source": f"gs://{obj.bucket}/{obj.name}", "generation": obj.generation,
            "reason": rejected.reason, "detail": rejected.detail, "copy": copied, "at": now,
        }
    )
    log.warning("quarantined gs://%s/%s: %s", obj.bucket, obj.name, rejected)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "document"
    return f"{where}: {err['msg']}"

