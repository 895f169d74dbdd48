"""The reference chain end to end, through the real local cloud, plus duplicates and reordering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulators.endpoints import REPLAY_TOPIC
from shared.datasets import SPEC_OBJECT
from shared.jobs import JobStatus, utcnow
from tests.conftest import wait_for
from tests.emulator.helpers import (
    after,
    dataset_doc,
    delivered,
    deliveries,
    event_mentions,
    job_of_dataset,
    jobs_for_dataset,
    upload_digits,
    wait_job,
)

pytestmark = pytest.mark.emulator


def test_upload_to_trained_model(cloud, clients):
    from shared import weights
    from workers.trainer.models import init_params

    upload_digits(clients, "e2e", parts=2)
    job = wait_job(clients, job_of_dataset(clients, "e2e"), {"completed", "failed"})

    assert job.status is JobStatus.COMPLETED, job.error
    assert [t.status for t in job.history] == ["pending", "scheduled", "running", "completed"]
    assert job.results["accuracy"] >= 0.9
    assert job.results["train_examples"] + job.results["test_examples"] == 1797
    # Processed shards and manifest entries stay in the node's own bucket.
    processed = [b.name for b in clients.gcs.list_blobs(clients.settings.processed_bucket("us"), prefix="e2e/")]
    assert sum(n.endswith(".parquet") for n in processed) == 2
    assert sum(n.endswith("manifest.json") for n in processed) == 2
    assert list(clients.gcs.list_blobs(clients.settings.processed_bucket("eu"), prefix="e2e/")) == []
    # The model is safetensors with exactly the shapes of the declared model.
    uri = job.results["model_uri"].removeprefix("gs://")
    bucket, name = uri.split("/", 1)
    params, meta = weights.from_bytes(
        clients.gcs.bucket(bucket).blob(name).download_as_bytes(),
        expected=weights.spec_of(init_params("mlp", 64, 10, (64,), 0)),
    )
    assert meta["job"] == job.id
    # Each raw upload was delivered once, as a production-shaped CloudEvent.
    uploads = delivered(clients, lambda r: r["trigger"] == "raw-upload-us" and r["subject"].startswith("objects/e2e/"), 3)
    assert sorted(r["subject"] for r in uploads) == ["objects/e2e/_dataset.json", "objects/e2e/part-0.csv", "objects/e2e/part-1.csv"]
    assert {r["type"] for r in uploads} == {"google.cloud.storage.object.v1.finalized"}
    assert {r["source"] for r in uploads} == {f"//storage.googleapis.com/projects/_/buckets/{clients.settings.raw_bucket('us')}"}


def test_files_before_their_declaration_are_processed_when_it_lands(cloud, clients):
    """Out-of-order uploads are normal: data first, declaration last."""
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("eu"))
    upload_digits(clients, "late-spec-src", node="eu", parts=2)  # a complete copy to take the files from
    job_of_dataset(clients, "late-spec-src", node="eu")
    for name in ("part-0.csv", "part-1.csv"):
        bucket.copy_blob(bucket.blob(f"late-spec-src/{name}"), bucket, f"late-spec/{name}")
    wait_for(
        lambda: len(list(clients.db.collection("datasets").document("eu~late-spec").collection("files").stream())) == 2,
        30, "both files to be recorded as awaiting their declaration",
    )
    assert dataset_doc(clients, "eu", "late-spec") == {}
    spec = bucket.blob(f"late-spec-src/{SPEC_OBJECT}").download_as_bytes()
    bucket.blob(f"late-spec/{SPEC_OBJECT}").upload_from_string(spec)

    job = wait_job(clients, job_of_dataset(clients, "late-spec", node="eu"), {"completed", "failed"})
    assert job.status is JobStatus.COMPLETED
    assert dataset_doc(clients, "eu", "late-spec")["rows"] == 1797


def test_duplicate_deliveries_give_one_shard_one_job_one_launch(cloud, clients):
    upload_digits(clients, "dup", parts=2)
    job_id = job_of_dataset(clients, "dup")
    wait_job(clients, job_id, {"completed"})
    shards_before = sorted(b.name for b in clients.gcs.list_blobs(clients.settings.processed_bucket("us"), prefix="dup/"))

    # Deliver every event of this chain a second time, with the same CloudEvent ids.
    replayed_at = utcnow()
    chain = deliveries(clients, lambda r: event_mentions(r, "dup") or job_id in r["subject"])
    assert {r["trigger"] for r in chain} == {"raw-upload-us", "shard-ready", "job-written"}
    topic = clients.publisher.topic_path(clients.settings.project, REPLAY_TOPIC)
    for record in chain:
        clients.publisher.publish(topic, json.dumps({"trigger": record["trigger"], "event": record["event"]}).encode()).result()
    ids = {(r["trigger"], r["event_id"]) for r in chain}
    wait_for(lambda: {(r["trigger"], r["event_id"]) for r in deliveries(clients, after(replayed_at))} >= ids, 60, "every replay to be delivered")

    assert [j.id for j in jobs_for_dataset(clients, "dup")] == [job_id]
    job = wait_job(clients, job_id, {"completed"})
    assert [t.status for t in job.history].count("scheduled") == 1
    assert len(list((Path(cloud.endpoints.state_dir) / "logs" / "jobs").glob(f"{job_id}.*.log"))) == 1
    assert sorted(b.name for b in clients.gcs.list_blobs(clients.settings.processed_bucket("us"), prefix="dup/")) == shards_before
    assert len(list(clients.db.collection("datasets").document("us~dup").collection("manifest").stream())) == 2


def test_reupload_of_a_file_makes_a_new_version_and_job(cloud, clients):
    upload_digits(clients, "reup", parts=2)
    first = job_of_dataset(clients, "reup")
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    data = bucket.blob("reup/part-1.csv").download_as_bytes()
    bucket.blob("reup/part-1.csv").upload_from_string(data)  # same bytes, new generation

    second = wait_for(lambda: (j := dataset_doc(clients, "us", "reup").get("job_id")) != first and j, 60, "a second job")
    jobs = {j.id: j for j in jobs_for_dataset(clients, "reup")}
    assert set(jobs) == {first, second}
    # Each job is pinned to the content that completed it, whichever version is current.
    v1, v2 = jobs[first].spec.dataset.version, jobs[second].spec.dataset.version
    assert first.endswith(v1) and second.endswith(v2) and v1 != v2
    versions = clients.db.collection("datasets").document("us~reup").collection("versions")
    gens = {v: versions.document(v).get().get("files")["part-1.csv"]["generation"] for v in (v1, v2)}
    assert gens[v1] < gens[v2]
    done = [wait_job(clients, j, {"completed", "failed"}) for j in (first, second)]
    assert [j.status for j in done] == ["completed", "completed"]


def test_redeclaring_a_complete_data_set_reprocesses_it_under_the_new_declaration(cloud, clients):
    upload_digits(clients, "redecl", parts=2)
    first = job_of_dataset(clients, "redecl")
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    spec = json.loads(bucket.blob(f"redecl/{SPEC_OBJECT}").download_as_bytes())
    bucket.blob(f"redecl/{SPEC_OBJECT}").upload_from_string(json.dumps({**spec, "features": spec["features"][:32]}))

    second = wait_for(lambda: (j := dataset_doc(clients, "us", "redecl").get("job_id")) != first and j, 60, "a job for the new declaration")
    job = wait_job(clients, second, {"completed", "failed"})
    assert job.status is JobStatus.COMPLETED, job.error
    version = clients.db.collection("datasets").document("us~redecl").collection("versions").document(job.spec.dataset.version).get()
    assert len(version.get("spec")["features"]) == 32 and version.get("rows") == 1797
    assert dataset_doc(clients, "us", "redecl")["status"] == "complete"


def test_a_slow_completion_never_steps_the_summary_back_to_an_older_version(cloud, clients, monkeypatch):
    """Two deliveries complete the same data set with different content; the slower one
    (holding the older version) must not overwrite the newer summary."""
    from google.cloud.firestore import DocumentReference

    from shared import manifest
    from shared.datasetstore import FirestoreDatasetStore
    from shared.jobstore import JobStore

    now = utcnow()
    store, create_job = FirestoreDatasetStore(clients.db, clients.settings), JobStore(clients.db, clients.settings).create
    spec = {"features": ["a"], "label": "y", "num_classes": 2, "expected_files": ["part.csv"], "train_on_complete": False}
    ds_ref = store.dataset_ref("us", "race-summary")
    ds_ref.set({"node": "us", "dataset": "race-summary", "spec": spec, "status": "collecting", "created_at": now, "updated_at": now})
    stats = {"count": 4, "mean": [0.5], "m2": [1.0], "label_counts": [2, 2]}
    entry = store.entry_ref("us", "race-summary", "part.csv")
    entry.set({"file": "part.csv", "generation": 1, "spec_generation": 0, "rows": 4, "shards": ["gs://x/1"], "stats": stats, "source": "gs://x/part.csv"})
    v1 = manifest.version_of({"part.csv": 1}, 0)

    real_set, raced = DocumentReference.set, []

    def newer_delivery_lands_first(self, data, *args, **kwargs):
        result = real_set(self, data, *args, **kwargs)
        if self.path.endswith(f"/versions/{v1}") and not raced:
            raced.append(True)  # while the v1 delivery is between its reads and its summary write:
            real_set(entry, {**entry.get().to_dict(), "generation": 2, "shards": ["gs://x/2"]})
            manifest.complete_if_ready(store, create_job, "us", "race-summary", now)
        return result

    monkeypatch.setattr(DocumentReference, "set", newer_delivery_lands_first)
    manifest.complete_if_ready(store, create_job, "us", "race-summary", now)

    summary = ds_ref.get().to_dict()
    assert raced and summary["status"] == "complete"
    assert summary["version"] == manifest.version_of({"part.csv": 2}, 0) != v1
    assert summary["files"]["part.csv"]["shards"] == ["gs://x/2"]


def test_shards_are_sealed_under_their_nodes_key_which_rotates_without_losing_a_shard(cloud, clients):
    """A key rotated while a data set is half processed: the older shards still open, the newer use the new key."""
    from emulators.endpoints import keystore_dir
    from fedpipe.demo import csv_bytes, load_table
    from shared.envelope import MAGIC, Envelope, EnvelopeError, LocalKeyStore, Purpose, local_key_id

    keys = LocalKeyStore(keystore_dir(Path(cloud.endpoints.state_dir)))
    table, features, num_classes = load_table("digits")
    raw = clients.gcs.bucket(clients.settings.raw_bucket("eu"))
    spec = {"features": features, "label": "label", "num_classes": num_classes, "expected_files": ["a.csv", "b.csv"]}
    raw.blob(f"sealed/{SPEC_OBJECT}").upload_from_string(json.dumps(spec))
    raw.blob("sealed/a.csv").upload_from_string(csv_bytes(table.slice(0, 900)))
    processed = clients.gcs.bucket(clients.settings.processed_bucket("eu"))
    wait_for(lambda: [b for b in processed.list_blobs(prefix="sealed/") if b.name.endswith(".parquet")], 30, "a.csv's shard")
    before = keys.primary_key_id("eu")
    after_rotation = keys.rotate("eu")
    raw.blob("sealed/b.csv").upload_from_string(csv_bytes(table.slice(900, 897)))

    job = wait_job(clients, job_of_dataset(clients, "sealed", node="eu"), {"completed", "failed"})

    assert job.status is JobStatus.COMPLETED, job.error
    assert job.results["train_examples"] + job.results["test_examples"] == 1797  # both halves opened
    shards = {b.name.split("/")[1]: b for b in processed.list_blobs(prefix="sealed/") if b.name.endswith(".parquet")}
    sealed = {key: blob.download_as_bytes() for key, blob in shards.items()}
    assert all(data.startswith(MAGIC) and b"PAR1" not in data[:64] for data in sealed.values())  # no plain Parquet at rest
    assert sorted(local_key_id(data) for data in sealed.values()) == sorted([before, after_rotation])
    name, data = next(iter(sealed.items()))
    with pytest.raises(EnvelopeError):  # another node's key opens none of it
        Envelope(keys.kek("us")).open(data, processed.name, shards[name].name, Purpose.SHARD)
