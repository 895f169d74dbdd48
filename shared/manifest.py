"""The data set manifest: which files are in, their shards and merged statistics.

`record_shards` runs on every shard-ready message, inside one Firestore transaction:
it adds the file (ignoring duplicates and stale generations), and when every
expected file is in, marks the data set complete and creates its training job.
The job id is derived from the files' generations, so the same content never makes
two jobs, and a re-upload of a file makes a new one.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from google.cloud import firestore
from pydantic import BaseModel

from shared.config import Settings
from shared.datasets import DatasetSpec, FeatureStats
from shared.jobs import DatasetRef, Job, JobSpec
from shared.jobstore import JobStore


class ShardReady(BaseModel, frozen=True):
    """The shard-ready message, also written as `manifest.json` beside the shards."""

    node: str
    dataset: str
    file: str
    generation: int
    source: str
    rows: int
    shards: list[str]
    stats: FeatureStats


def dataset_doc_id(node: str, dataset: str) -> str:
    return DatasetRef(node=node, dataset=dataset).id


def version_of(files: dict[str, dict]) -> str:
    """A short digest of which generation of each file the data set holds."""
    key = ",".join(f"{name}@{files[name]['generation']}" for name in sorted(files))
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def merged_stats(files: dict[str, dict]) -> FeatureStats:
    stats = [FeatureStats.model_validate(files[name]["stats"]) for name in sorted(files)]
    total = stats[0]
    for s in stats[1:]:
        total = total.merge(s)
    return total


def apply_shard_ready(dataset: dict, ready: ShardReady, now: datetime) -> tuple[dict, Job | None] | None:
    """Pure: the data set document after `ready`, and the job to create if it just completed.

    None when the message changes nothing (a duplicate, or older than what is held).
    """
    files = dict(dataset.get("files", {}))
    held = files.get(ready.file)
    if held is not None and held["generation"] >= ready.generation:
        return None
    files[ready.file] = {
        "generation": ready.generation, "rows": ready.rows, "shards": ready.shards,
        "stats": ready.stats.model_dump(), "source": ready.source,
    }
    spec = DatasetSpec.model_validate(dataset["spec"])
    updated = {**dataset, "files": files, "updated_at": now}
    if not set(spec.expected_files) <= files.keys():
        return updated, None
    version = version_of({k: files[k] for k in spec.expected_files})
    if dataset.get("version") == version:
        return updated, None
    stats = merged_stats({k: files[k] for k in spec.expected_files})
    job = Job.new(
        f"train-{ready.node}-{ready.dataset}-{version}",
        JobSpec(dataset=DatasetRef(node=ready.node, dataset=ready.dataset), train=spec.train),
        now,
    )
    updated.update(status="complete", version=version, stats=stats.model_dump(), rows=stats.count, job_id=job.id, completed_at=now)
    return updated, job


def record_shards(db: firestore.Client, settings: Settings, ready: ShardReady, now: datetime) -> tuple[bool, Job | None]:
    """Apply one shard-ready message in a transaction; returns (changed, job created)."""
    ref = db.collection(settings.datasets_collection).document(dataset_doc_id(ready.node, ready.dataset))
    jobs = JobStore(db, settings)

    @firestore.transactional
    def run(transaction: firestore.Transaction) -> tuple[bool, Job | None]:
        snap = ref.get(transaction=transaction)
        if not snap.exists:
            raise LookupError(f"data set {ready.node}/{ready.dataset} has no declaration")
        outcome = apply_shard_ready(snap.to_dict(), ready, now)
        if outcome is None:
            return False, None
        updated, job = outcome
        transaction.set(ref, updated)
        if job is not None:
            jobs.create(job, transaction)
        return True, job

    return run(db.transaction())
