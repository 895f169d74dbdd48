"""shared.datasetstore: the data set and file-record lifecycles, on the in-memory store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.datasets import DatasetSpec, FeatureStats
from shared.datasetstore import (
    DATASET_TRANSITIONS,
    FILE_TRANSITIONS,
    Dataset,
    DatasetStatus,
    FileEntry,
    FileRecord,
    FileStatus,
    InvalidTransition,
    MemoryDatasetStore,
    declared,
)
from shared.ingest import claimed
from shared.jobs import DatasetRef
from shared.manifest import complete_if_ready

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SPEC = DatasetSpec(features=["f0"], label="y", num_classes=2, expected_files=["a.csv", "b.csv"], train_on_complete=False)
STATS = FeatureStats(count=2, mean=[1.0], m2=[0.5], label_counts=[1, 1])


def entry(name: str, generation: int, spec_generation: int = 1) -> FileEntry:
    return FileEntry(file=name, generation=generation, spec_generation=spec_generation, rows=2, shards=[f"gs://p/{name}/{generation}"],
                     stats=STATS, source=f"gs://r/ds/{name}")


def declare(store: MemoryDatasetStore, generation: int, spec: DatasetSpec = SPEC) -> Dataset | None:
    return store.update_dataset("us", "ds", lambda current: declared(current, "us", "ds", spec, generation, NOW))


def test_every_status_is_reachable_and_nothing_leaves_a_data_set_without_a_declaration():
    assert {to for _, to in DATASET_TRANSITIONS} == set(DatasetStatus)
    assert {to for _, to in FILE_TRANSITIONS} == set(FileStatus)
    assert (None, DatasetStatus.COMPLETE) not in DATASET_TRANSITIONS  # complete only after collecting
    assert (FileStatus.PROCESSED, FileStatus.PUBLISHING) not in FILE_TRANSITIONS


def test_a_declaration_is_stored_once_and_an_older_one_changes_nothing():
    store = MemoryDatasetStore()
    first = declare(store, 5)
    assert (first.status, first.spec_generation) == ("collecting", 5)
    assert declare(store, 5) is None and declare(store, 4) is None
    assert store.dataset("us", "ds") == first


def test_a_data_set_completes_once_per_content_and_its_version_is_pinned():
    store, jobs = MemoryDatasetStore(), []
    declare(store, 1)
    assert store.put_entry("us", "ds", entry("a.csv", 10))
    assert complete_if_ready(store, jobs.append, "us", "ds", NOW) is None  # b.csv is missing
    assert store.put_entry("us", "ds", entry("b.csv", 20))
    assert not store.put_entry("us", "ds", entry("b.csv", 20))  # a duplicate
    assert not store.put_entry("us", "ds", entry("b.csv", 19))  # an older upload
    complete_if_ready(store, jobs.append, "us", "ds", NOW)
    ds = store.dataset("us", "ds")
    assert (ds.status, ds.rows, jobs) == ("complete", 4, [])  # train_on_complete is false
    pinned = store.pinned(DatasetRef(node="us", dataset="ds", version=ds.version))
    assert pinned == store.pinned(DatasetRef(node="us", dataset="ds"))
    assert pinned.shard_uris() == {"a.csv": ["gs://p/a.csv/10"], "b.csv": ["gs://p/b.csv/20"]}
    assert pinned.spec == SPEC and pinned.stats == STATS.merge(STATS)
    assert store.pinned(DatasetRef(node="us", dataset="ds", version="nope")) is None


def test_a_redeclared_data_set_collects_again_and_is_not_pinned_until_complete():
    store = MemoryDatasetStore()
    declare(store, 1)
    for name in ("a.csv", "b.csv"):
        store.put_entry("us", "ds", entry(name, 10))
    complete_if_ready(store, lambda job: True, "us", "ds", NOW)
    old_version = store.dataset("us", "ds").version
    again = declare(store, 2)
    assert (again.status, again.version) == ("collecting", old_version)  # the last version's summary is kept
    assert store.pinned(DatasetRef(node="us", dataset="ds")) is None
    assert complete_if_ready(store, lambda job: True, "us", "ds", NOW) is None  # entries of declaration 1 do not count


def test_a_summary_written_over_a_changed_data_set_is_refused():
    store = MemoryDatasetStore()
    declare(store, 1)
    stale = store.stored("us", "ds")
    declare(store, 2)
    assert not store.replace_if_unchanged(stale, stale.dataset.model_copy(update={"status": "complete"}))
    assert store.dataset("us", "ds").spec_generation == 2


def test_a_claim_follows_the_file_table():
    waiting = claimed(None, "a.csv", 7, None, "e1", NOW)
    assert (waiting.status, waiting.spec_generation, waiting.claimed_by) == ("awaiting_declaration", None, None)
    mine = claimed(waiting, "a.csv", 7, 3, "e1", NOW)
    assert (mine.status, mine.spec_generation, mine.claimed_by, mine.claimed_at) == ("processing", 3, "e1", NOW)
    publishing = mine.moved(FileStatus.PUBLISHING, NOW, rows=5, manifest_sha256="ab")
    done = publishing.moved(FileStatus.PROCESSED, NOW)
    assert (done.status, done.rows, done.manifest_sha256) == ("processed", 5, "ab")
    with pytest.raises(InvalidTransition, match="from processed to publishing"):
        done.moved(FileStatus.PUBLISHING, NOW)
    with pytest.raises(InvalidTransition, match="from awaiting_declaration to quarantined"):
        waiting.moved(FileStatus.QUARANTINED, NOW)
    again = claimed(done, "a.csv", 8, 3, "e2", NOW)  # a newer upload drops what the older claim held
    assert (again.generation, again.rows, again.manifest_sha256) == (8, None, None)


def test_file_records_round_trip_through_the_store():
    store = MemoryDatasetStore()
    record = FileRecord(name="a b.csv", generation=3, spec_generation=1, status="processing", claimed_by="e", claimed_at=NOW, updated_at=NOW)
    assert store.update_file("us", "ds", "a b.csv", lambda held, ds: record if held is None and ds is None else None) == record
    assert store.file_record("us", "ds", "a b.csv") == record
    assert store.update_file("us", "ds", "a b.csv", lambda held, ds: None) is None
    assert store.file_record("us", "ds", "other.csv") is None
