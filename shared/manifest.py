"""The data set manifest: which files are in, their shards and merged statistics.

`record_shards` runs on every shard-ready message: it adds the file's manifest entry
(ignoring duplicates and stale generations), and when every expected file is in,
marks the data set complete and creates its training job.
The job id is derived from the files' generations, so the same content never makes
two jobs, and a re-upload of a file makes a new one.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from google.api_core.exceptions import FailedPrecondition
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
    spec_generation: int = 0  # the declaration the file was processed under
    source: str
    rows: int
    shards: list[str]
    stats: FeatureStats


def dataset_doc_id(node: str, dataset: str) -> str:
    return DatasetRef(node=node, dataset=dataset).id


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
        "generation": ready.generation, "spec_generation": ready.spec_generation, "rows": ready.rows, "shards": ready.shards,
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
    ds_ref = db.collection(settings.datasets_collection).document(dataset_doc_id(ready.node, ready.dataset))
    entry_ref = ds_ref.collection("manifest").document(ready.file)

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
        entries = {entry.id: entry.to_dict() for entry in ds_ref.collection("manifest").stream()}
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
