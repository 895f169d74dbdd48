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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from google.cloud import firestore
from pydantic import BaseModel, Field, ValidationError

from shared.config import Settings
from shared.datasets import DATASET_NAME, MAX_OBJECT_NAME_BYTES, FeatureStats, file_key
from shared.datasetstore import (
    Dataset,
    DatasetStatus,
    DatasetStore,
    DatasetVersion,
    FileEntry,
    FileRecord,
    FirestoreDatasetStore,
    check_dataset_transition,
)
from shared.jobs import NODE_NAME, DatasetRef, Job, JobSpec
from shared.jobstore import JobStore
from shared.quarantine import QuarantineRecord, QuarantineStore

MAX_SHARDS = 100_000  # a file of the 64 MiB upload limit makes far fewer


class ShardReady(BaseModel, frozen=True):
    """The shard-ready message, also written as `manifest.json` beside the shards."""

    # Bounded and shaped like what ingest writes: a message naming anything else is refused as malformed.
    node: str = Field(pattern=NODE_NAME)
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


def version_of(generations: dict[str, int], spec_generation: int | None = None) -> str:
    """A short digest of which generation of each file (and of the declaration) the data set holds."""
    key = ",".join(f"{name}@{generations[name]}" for name in sorted(generations))
    if spec_generation is not None:
        key += f";spec@{spec_generation}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def merged_stats(stats: list[FeatureStats]) -> FeatureStats:
    total = stats[0]
    for s in stats[1:]:
        total = total.merge(s)
    return total


def entry_of(ready: ShardReady) -> FileEntry:
    return FileEntry(file=ready.file, generation=ready.generation, spec_generation=ready.spec_generation, rows=ready.rows,
                     shards=ready.shards, stats=ready.stats, source=ready.source)


def completion(ds: Dataset, entries: list[FileEntry], now: datetime) -> tuple[Dataset, DatasetVersion, Job | None] | None:
    """Pure: if every expected file is in and this content is new, the data set as complete, its
    version's record, and its training job (None if the declaration asks for none); else None."""
    # Only files processed under the current declaration count (a re-declaration reprocesses them).
    current = {e.file: e for e in entries if e.spec_generation == ds.spec_generation}
    if not set(ds.spec.expected_files) <= current.keys():
        return None
    files = {name: current[name] for name in ds.spec.expected_files}
    version = version_of({name: e.generation for name, e in files.items()}, ds.spec_generation)
    if ds.version == version:
        return None
    check_dataset_transition(ds.status, DatasetStatus.COMPLETE)
    stats = merged_stats([files[name].stats for name in sorted(files)])
    content = DatasetVersion(spec=ds.spec, files=files, stats=stats, rows=stats.count, completed_at=now)
    summary = {"status": DatasetStatus.COMPLETE, "version": version, "files": files, "stats": stats, "rows": stats.count,
               "completed_at": now, "updated_at": now}
    if not ds.spec.train_on_complete:
        return ds.model_copy(update=summary), content, None
    job = Job.new(f"train-{ds.node}-{ds.dataset}-{version}", JobSpec(dataset=DatasetRef(node=ds.node, dataset=ds.dataset, version=version),
                                                                    train=ds.spec.train), now)
    return ds.model_copy(update={**summary, "job_id": job.id}), content, job


def record_shards(store: DatasetStore, create_job: Callable[[Job], bool], ready: ShardReady, now: datetime) -> tuple[bool, Job | None]:
    """Record one file's shards, then create the job if the data set just became complete.

    Each file has its own manifest entry, so files arriving together do not contend
    for one document; the job's id is derived from the content, so concurrent or
    repeated completions create it once.
    """
    changed = store.put_entry(ready.node, ready.dataset, entry_of(ready))
    # Checked even for a duplicate: the delivery that recorded it may have crashed right after.
    return changed, complete_if_ready(store, create_job, ready.node, ready.dataset, now)


def complete_if_ready(store: DatasetStore, create_job: Callable[[Job], bool], node: str, dataset: str, now: datetime) -> Job | None:
    """If the data set's files and declaration make a new complete version, record it and
    create its job (returned if this call created it; `create_job` is False for one that exists).

    The summary is written only over the document as it was read: should another
    delivery have moved it on meanwhile, this one starts over from what it wrote, so
    the summary never steps back to an older version.
    """
    created = None
    for _ in range(SUMMARY_ATTEMPTS):
        stored = store.stored(node, dataset)
        if stored is None:
            raise LookupError(f"data set {node}/{dataset} has no declaration")
        outcome = completion(stored.dataset, store.entries(node, dataset), now)
        if outcome is None:
            return created
        complete, content, job = outcome
        # The version's own record first: the job trains on exactly this content, whatever is uploaded later.
        store.put_version(node, dataset, complete.version, content)
        if job is not None and create_job(job):
            created = job
        if store.replace_if_unchanged(stored, complete):
            return created
    raise RuntimeError(f"data set {node}/{dataset} kept changing while its summary was written; the event will be retried")


SUMMARY_ATTEMPTS = 5


@dataclass(frozen=True)
class ShardOutcome:
    """What one shard-ready message did: recorded its file, was a duplicate, or was refused (and why)."""

    status: Literal["recorded", "duplicate", "refused"]
    ready: ShardReady | None = None
    job: Job | None = None  # the training job this message's completion created
    reason: str | None = None


def shard_ready_problem(settings: Settings, ready: ShardReady, message: bytes, record: FileRecord | None) -> str | None:
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
    if record is None or record.name != ready.file:
        return "no_such_upload"
    if (record.generation, record.spec_generation) != (ready.generation, ready.spec_generation):
        return "generation_mismatch"
    if record.manifest_sha256 != hashlib.sha256(message).hexdigest():
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
    store = FirestoreDatasetStore(db, settings)
    try:
        ready = ShardReady.model_validate_json(message)
    except ValidationError:
        ready = None
    if ready is None:
        problem = "malformed"
    else:
        problem = shard_ready_problem(settings, ready, message, store.file_record(ready.node, ready.dataset, ready.file))
    if problem is not None:
        QuarantineStore(db, settings).put(QuarantineRecord(
            node=ready.node if ready and ready.node in settings.nodes else None, dataset=ready.dataset if ready else None,
            source=f"pubsub://{settings.shard_ready_topic}/{message_id}", reason=problem, detail=REFUSAL_DETAILS[problem], at=now,
        ))
        return ShardOutcome("refused", ready, reason=problem)
    changed, job = record_shards(store, JobStore(db, settings).create, ready, now)
    return ShardOutcome("recorded" if changed else "duplicate", ready, job)
