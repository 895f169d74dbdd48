"""The data set manifest: which files are in, their shards and merged statistics.

`handle_shard_ready` runs on every shard-ready message. It accepts only the message
ingest wrote for the node's own processed bucket (a forged or mistaken one is
quarantined with its reason and acknowledged), then `record_shards` adds the file's
manifest entry (ignoring duplicates and stale generations), and when every expected
file is in, marks the data set complete and creates its training job.
The job id is derived from the files' generations, so the same content never makes
two jobs, and a re-upload of a file makes a new one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from google.api_core.exceptions import FailedPrecondition
from google.cloud import firestore
from pydantic import BaseModel, Field, ValidationError

from shared.config import Settings
from shared.datasets import DATASET_NAME, MAX_OBJECT_NAME_BYTES, DatasetSpec, FeatureStats, file_key
from shared.federation import NODE_NAME
from shared.jobs import DatasetRef, Job, JobSpec
from shared.jobstore import JobStore
from shared.quarantine import QuarantineRecord, QuarantineStore

MAX_SHARDS = 100_000  # a file of the 64 MiB upload limit makes far fewer


class ShardReady(BaseModel, frozen=True):
    """The shard-ready message, also written as `manifest.json` beside the shards."""

    # Bounded and shaped like what ingest writes: a message naming anything else is refused as malformed.
    node: str = Field(pattern=f"^{NODE_NAME}$", max_length=63)
    dataset: str = Field(pattern=DATASET_NAME)
    file: str = Field(min_length=1, max_length=MAX_OBJECT_NAME_BYTES)
    generation: int = Field(ge=1)
    spec_generation: int = Field(default=0, ge=0)  # the declaration the file was processed under
    source: str = Field(max_length=2048)
    rows: int = Field(ge=1)
    shards: list[Annotated[str, Field(max_length=2048)]] = Field(min_length=1, max_length=MAX_SHARDS)
    stats: FeatureStats


def processed_prefix(dataset: str, file_name: str, generation: int, spec_generation: int) -> str:
    """Where ingest writes one upload's shards and manifest in the node's processed bucket."""
    return f"{dataset}/{file_key(file_name)}/g{generation}-s{spec_generation}"


def dataset_doc_id(node: str, dataset: str) -> str:
    return DatasetRef(node=node, dataset=dataset).id


def dataset_ref(db: firestore.Client, settings: Settings, node: str, dataset: str) -> firestore.DocumentReference:
    """A node's data set document: its declaration, status and current version."""
    return db.collection(settings.datasets_collection).document(dataset_doc_id(node, dataset))


def file_ref(db: firestore.Client, settings: Settings, node: str, dataset: str, file_name: str) -> firestore.DocumentReference:
    """The record of one file of a data set, written by ingest: which upload was handled, under which declaration, how."""
    return dataset_ref(db, settings, node, dataset).collection("files").document(file_key(file_name))


def version_of(files: dict[str, dict], spec_generation: int | None = None) -> str:
    """A short digest of which generation of each file (and of the declaration) the data set holds."""
    key = ",".join(f"{name}@{files[name]['generation']}" for name in sorted(files))
    if spec_generation is not None:
        key += f";spec@{spec_generation}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def merged_stats(files: dict[str, dict]) -> FeatureStats:
    stats = [FeatureStats.model_validate(files[name]["stats"]) for name in sorted(files)]
    total = stats[0]
    for s in stats[1:]:
        total = total.merge(s)
    return total


def entry_of(ready: ShardReady) -> dict:
    return {
        "file": ready.file, "generation": ready.generation, "spec_generation": ready.spec_generation, "rows": ready.rows, "shards": ready.shards,
        "stats": ready.stats.model_dump(), "source": ready.source,
    }


def completion(dataset: dict, entries: dict[str, dict], now: datetime) -> tuple[dict, Job | None] | None:
    """Pure: if every expected file is in and this content is new, the data set's new
    summary and its training job (None if the declaration asks for none); else None."""
    spec = DatasetSpec.model_validate(dataset["spec"])
    # Only files processed under the current declaration count (a re-declaration reprocesses them).
    entries = {k: v for k, v in entries.items() if v.get("spec_generation", 0) == dataset.get("spec_generation", 0)}
    if not set(spec.expected_files) <= entries.keys():
        return None
    files = {name: entries[name] for name in spec.expected_files}
    version = version_of(files, dataset.get("spec_generation"))
    if dataset.get("version") == version:
        return None
    stats = merged_stats(files)
    node, name = dataset["node"], dataset["dataset"]
    summary = {
        "status": "complete", "version": version, "files": files, "stats": stats.model_dump(),
        "rows": stats.count, "completed_at": now, "updated_at": now,
    }
    if not spec.train_on_complete:
        return summary, None
    job = Job.new(f"train-{node}-{name}-{version}", JobSpec(dataset=DatasetRef(node=node, dataset=name, version=version), train=spec.train), now)
    return {**summary, "job_id": job.id}, job


def record_shards(db: firestore.Client, settings: Settings, ready: ShardReady, now: datetime) -> tuple[bool, Job | None]:
    """Record one file's shards, then create the job if the data set just became complete.

    Each file has its own manifest entry, so files arriving together do not contend
    for one document; the job's id is derived from the content, so concurrent or
    repeated completions create it once.
    """
    ds_ref = dataset_ref(db, settings, ready.node, ready.dataset)
    entry_ref = ds_ref.collection("manifest").document(file_key(ready.file))

    @firestore.transactional
    def put(transaction: firestore.Transaction) -> bool:
        held = (entry_ref.get(transaction=transaction).to_dict() or {})
        if (held.get("generation", -1), held.get("spec_generation", 0)) >= (ready.generation, ready.spec_generation):
            return False  # a duplicate, or older than what is held
        transaction.set(entry_ref, entry_of(ready))
        return True

    changed = put(db.transaction())
    # Checked even for a duplicate: the delivery that recorded it may have crashed right after.
    return changed, complete_if_ready(db, settings, ds_ref, now)


def complete_if_ready(db: firestore.Client, settings: Settings, ds_ref: firestore.DocumentReference, now: datetime) -> Job | None:
    """If the data set's files and declaration make a new complete version, record it and
    create its job (returned if this call created it).

    The summary is written only over the document as it was read: should another
    delivery have moved it on meanwhile, this one starts over from what it wrote, so
    the summary never steps back to an older version.
    """
    created = None
    for _ in range(SUMMARY_ATTEMPTS):
        snap = ds_ref.get()
        if not snap.exists:
            raise LookupError(f"data set {ds_ref.id} has no declaration")
        entries = {(e := entry.to_dict())["file"]: e for entry in ds_ref.collection("manifest").stream()}
        outcome = completion(snap.to_dict(), entries, now)
        if outcome is None:
            return created
        summary, job = outcome
        # The version's own record first: the job trains on exactly this content, whatever is uploaded later.
        version = {k: summary[k] for k in ("files", "stats", "rows", "completed_at")} | {"spec": snap.get("spec")}
        ds_ref.collection("versions").document(summary["version"]).set(version)
        if job is not None and JobStore(db, settings).create(job):
            created = job
        try:
            ds_ref.update(summary, option=db.write_option(last_update_time=snap.update_time))
        except FailedPrecondition:
            continue
        return created
    raise RuntimeError(f"data set {ds_ref.id} kept changing while its summary was written; the event will be retried")


SUMMARY_ATTEMPTS = 5


@dataclass(frozen=True)
class ShardOutcome:
    """What one shard-ready message did: recorded its file, was a duplicate, or was refused (and why)."""

    status: Literal["recorded", "duplicate", "refused"]
    ready: ShardReady | None = None
    job: Job | None = None  # the training job this message's completion created
    reason: str | None = None


def shard_ready_problem(settings: Settings, ready: ShardReady, message: bytes, record: dict | None) -> str | None:
    """Pure: why a shard-ready message is not the one ingest published for this upload (None if it is).

    The message is trusted only as far as it agrees with what the node's ingest wrote:
    its shards lie under the upload's own prefix in the node's own processed bucket, and
    the file record holds the same generation, declaration and message digest. So a
    published message cannot point a node's job at another node's bucket, nor make a
    later genuine upload look like a duplicate.
    """
    if ready.node not in settings.nodes:
        return "unknown_node"
    prefix = f"gs://{settings.processed_bucket(ready.node)}/{processed_prefix(ready.dataset, ready.file, ready.generation, ready.spec_generation)}/"
    if not all(uri.startswith(prefix) and "/" not in uri.removeprefix(prefix) for uri in ready.shards):
        return "foreign_shards"
    if record is None or record.get("name") != ready.file:
        return "no_such_upload"
    if (record.get("generation"), record.get("spec_generation")) != (ready.generation, ready.spec_generation):
        return "generation_mismatch"
    if record.get("manifest_sha256") != hashlib.sha256(message).hexdigest():
        return "not_from_ingest"
    return None


REFUSAL_DETAILS = {
    "malformed": "not a shard-ready message",
    "unknown_node": "names a node this deployment does not have",
    "foreign_shards": "names shards outside the upload's own prefix in the node's processed bucket",
    "no_such_upload": "names a file upload that ingest never processed",
    "generation_mismatch": "names a generation or declaration other than the one ingest recorded for the file",
    "not_from_ingest": "differs from the message ingest published for this upload",
}


def handle_shard_ready(db: firestore.Client, settings: Settings, message: bytes, message_id: str, now: datetime) -> ShardOutcome:
    """Check one shard-ready message against ingest's record, then record its shards.

    A message that fails a check can never succeed on a retry: it is quarantined with
    its reason and acknowledged, before anything is written to the manifest.
    """
    try:
        ready = ShardReady.model_validate_json(message)
    except ValidationError:
        ready = None
    if ready is None:
        problem = "malformed"
    else:
        record = file_ref(db, settings, ready.node, ready.dataset, ready.file).get().to_dict()
        problem = shard_ready_problem(settings, ready, message, record)
    if problem is not None:
        QuarantineStore(db, settings).put(QuarantineRecord(
            node=ready.node if ready and ready.node in settings.nodes else None, dataset=ready.dataset if ready else None,
            source=f"pubsub://{settings.shard_ready_topic}/{message_id}", reason=problem, detail=REFUSAL_DETAILS[problem], at=now,
        ))
        return ShardOutcome("refused", ready, reason=problem)
    changed, job = record_shards(db, settings, ready, now)
    return ShardOutcome("recorded" if changed else "duplicate", ready, job)
