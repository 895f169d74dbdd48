"""shared.manifest (pure parts) and shared.datasets: versions, merged statistics, completion, declarations."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from shared.config import Settings
from shared.datasets import MAX_OBJECT_NAME_BYTES, SPEC_OBJECT, DatasetSpec, FeatureStats, file_key, split_object_name
from shared.datasetstore import Dataset, DatasetVersion, FileEntry, FileRecord
from shared.jobs import DatasetRef, JobStatus, TrainSpec
from shared.manifest import (
    ShardReady,
    completion,
    dataset_doc_id,
    entry_of,
    merged_stats,
    processed_prefix,
    shard_ready_problem,
    version_of,
)

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TRAIN = TrainSpec(model="logreg", hidden=(), epochs=7, batch_size=32, learning_rate=0.01, seed=3)
SPEC = DatasetSpec(features=["f0", "f1"], label="y", num_classes=3, expected_files=["a.csv", "b.csv"], train=TRAIN)


def stats_of(x: np.ndarray, y: np.ndarray, num_classes: int = 3) -> FeatureStats:
    mean = x.mean(axis=0)
    return FeatureStats(
        count=len(x),
        mean=[float(v) for v in mean],
        m2=[float(v) for v in np.square(x - mean).sum(axis=0)],
        label_counts=[int(v) for v in np.bincount(y, minlength=num_classes)],
    )


def entry(generation: int, stats: FeatureStats, name: str = "a.csv", spec_generation: int = 0) -> FileEntry:
    return FileEntry(file=name, generation=generation, spec_generation=spec_generation, rows=stats.count,
                     shards=[f"iris/{name}/{generation}/shard-00000.parquet"], stats=stats, source=f"gs://fedpipe-local-us-raw/iris/{name}")


STATS_A = FeatureStats(count=3, mean=[1.0, 2.0], m2=[3.0, 4.0], label_counts=[1, 1, 1])
STATS_B = FeatureStats(count=5, mean=[10.0, -2.0], m2=[30.0, 40.0], label_counts=[2, 0, 3])


def dataset_doc(**extra) -> Dataset:
    return Dataset(node="us", dataset="iris", status="collecting", spec=SPEC, created_at=NOW, updated_at=NOW, **extra)


# -- version_of / merged_stats ------------------------------------------------


def test_version_is_order_independent():
    one = {"a.csv": 1, "b.csv": 2}
    other = {"b.csv": 2, "a.csv": 1}
    assert list(one) != list(other)
    assert version_of(one) == version_of(other)
    assert len(version_of(one)) == 10
    assert all(c in "0123456789abcdef" for c in version_of(one))


def test_version_changes_with_a_generation():
    base = {"a.csv": 1, "b.csv": 2}
    assert version_of(base) != version_of({**base, "b.csv": 3})
    assert version_of(base) != version_of({"a.csv": 2, "b.csv": 1})
    assert version_of(base) != version_of(base, 0) != version_of(base, 1)  # and with the declaration


def test_merged_stats_equals_a_merge_by_hand():
    merged = merged_stats([STATS_A, STATS_B])
    assert merged == STATS_A.merge(STATS_B)
    # mean = (3*1 + 5*10)/8, (3*2 - 5*2)/8; m2 = m2_a + m2_b + delta**2 * 3*5/8 (all exact in binary)
    assert merged == FeatureStats(count=8, mean=[6.625, -0.5], m2=[184.875, 74.0], label_counts=[3, 1, 4])


def test_merged_stats_of_one_file_is_that_file():
    assert merged_stats([STATS_A]) == STATS_A


def test_dataset_doc_id():
    assert dataset_doc_id("us", "iris") == "us~iris"


def test_entry_of_a_shard_ready_message():
    ready = ShardReady(node="us", dataset="iris", file="a.csv", generation=5, source="gs://b/iris/a.csv",
                       rows=3, shards=["s0"], stats=STATS_A)
    assert entry_of(ready) == FileEntry(file="a.csv", generation=5, spec_generation=0, rows=3, shards=["s0"], stats=STATS_A,
                                        source="gs://b/iris/a.csv")


def test_only_files_processed_under_the_current_declaration_complete_it():
    doc = dataset_doc(spec_generation=2)
    old = [entry(11, STATS_A, spec_generation=1), entry(22, STATS_B, "b.csv", spec_generation=1)]
    assert completion(doc, old, NOW) is None
    new = [e.model_copy(update={"spec_generation": 2}) for e in old]
    complete, _, _ = completion(doc, new, NOW)
    assert complete.version == version_of({"a.csv": 11, "b.csv": 22}, 2) != version_of({"a.csv": 11, "b.csv": 22})


# -- completion ---------------------------------------------------------------


def test_incomplete_data_set_has_no_job():
    assert completion(dataset_doc(), [], NOW) is None
    assert completion(dataset_doc(), [entry(1, STATS_A)], NOW) is None
    # A file that is not expected does not stand in for a missing one.
    assert completion(dataset_doc(), [entry(1, STATS_A), entry(1, STATS_B, "c.csv")], NOW) is None


def test_complete_data_set_gives_summary_version_and_job():
    entries = [entry(11, STATS_A), entry(22, STATS_B, "b.csv")]
    outcome = completion(dataset_doc(), entries, NOW)
    assert outcome is not None
    complete, content, job = outcome
    version = version_of({"a.csv": 11, "b.csv": 22}, 0)
    assert job.id == f"train-us-iris-{version}"
    assert job.status is JobStatus.PENDING and job.attempt == 1
    assert job.created_at == NOW
    assert job.spec.dataset == DatasetRef(node="us", dataset="iris", version=version)  # pinned to this content
    assert job.spec.train == TRAIN
    assert (complete.status, complete.version, complete.job_id, complete.rows) == ("complete", version, job.id, 8)
    assert complete.stats == STATS_A.merge(STATS_B)
    assert complete.files == {"a.csv": entries[0], "b.csv": entries[1]}
    assert complete.completed_at == NOW and complete.updated_at == NOW
    assert content == DatasetVersion(spec=SPEC, files=complete.files, stats=complete.stats, rows=8, completed_at=NOW)
    assert content.shard_uris() == {"a.csv": entries[0].shards, "b.csv": entries[1].shards}


def test_extra_entries_are_left_out_of_the_summary():
    entries = [entry(1, STATS_A), entry(2, STATS_B, "b.csv"), entry(9, STATS_A, "old.csv")]
    complete, _, job = completion(dataset_doc(), entries, NOW)
    assert set(complete.files) == {"a.csv", "b.csv"}
    assert complete.rows == 8
    assert job.id == f"train-us-iris-{version_of({'a.csv': 1, 'b.csv': 2}, 0)}"


def test_already_recorded_version_has_no_new_job():
    entries = [entry(1, STATS_A), entry(2, STATS_B, "b.csv")]
    complete, _, _ = completion(dataset_doc(), entries, NOW)
    assert completion(complete, entries, NOW) is None


def test_new_generation_of_a_file_makes_a_new_job():
    entries = [entry(1, STATS_A), entry(2, STATS_B, "b.csv")]
    complete, _, first = completion(dataset_doc(), entries, NOW)
    outcome = completion(complete, [entries[0], entry(3, STATS_B, "b.csv")], NOW)
    assert outcome is not None
    newer, _, second = outcome
    assert second.id != first.id
    assert second.id == f"train-us-iris-{version_of({'a.csv': 1, 'b.csv': 3}, 0)}"
    assert newer.version != complete.version


def test_same_content_gives_the_same_job_id():
    entries = [entry(1, STATS_A), entry(2, STATS_B, "b.csv")]
    _, _, one = completion(dataset_doc(), entries, NOW)
    _, _, two = completion(dataset_doc(), entries[::-1], datetime(2025, 1, 1, tzinfo=UTC))
    assert one.id == two.id


# -- DatasetSpec --------------------------------------------------------------


def spec(**changes) -> dict:
    return {"features": ["f0", "f1"], "label": "y", "num_classes": 2, "expected_files": ["a.csv"], **changes}


def test_valid_spec():
    parsed = DatasetSpec.model_validate(spec())
    assert parsed.shard_rows == 4096
    assert parsed.train == TrainSpec()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"label": "f0"}, id="label-is-a-feature"),
        pytest.param({"features": ["f0", "f0"]}, id="duplicate-features"),
        pytest.param({"expected_files": ["dir/a.csv"]}, id="slash-in-file"),
        pytest.param({"expected_files": [SPEC_OBJECT]}, id="spec-object"),
        pytest.param({"expected_files": ["a.csv", "a.csv"]}, id="duplicate-files"),
        pytest.param({"expected_files": []}, id="no-files"),
        pytest.param({"expected_files": [".."]}, id="parent"),
        pytest.param({"expected_files": ["a\nb.csv"]}, id="newline"),
        pytest.param({"expected_files": ["\ud800.csv"]}, id="lone-surrogate"),
        pytest.param({"expected_files": ["x" * 1024]}, id="too-long"),
        pytest.param({"features": []}, id="no-features"),
        pytest.param({"num_classes": 1}, id="one-class"),
        pytest.param({"shard_rows": 0}, id="zero-shard-rows"),
        pytest.param({"shard_rows": 1}, id="one-object-per-row"),
        pytest.param({"shard_rows": 63}, id="shard-rows-below-64"),
        pytest.param({"shard_rows": 1_048_577}, id="shard-rows-above-2-20"),
        pytest.param({"shard_rows": 10**18}, id="huge-shard-rows"),
        pytest.param({"train": {"epochs": 0}}, id="bad-train"),
    ],
)
def test_invalid_specs_are_refused(changes):
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate(spec(**changes))


@pytest.mark.parametrize("rows", [64, 4096, 1_048_576])
def test_shard_rows_within_bounds_are_accepted(rows):
    assert DatasetSpec.model_validate(spec(shard_rows=rows)).shard_rows == rows


def test_spec_error_messages_name_the_problem():
    with pytest.raises(ValidationError, match="also listed as a feature"):
        DatasetSpec.model_validate(spec(label="f1"))
    with pytest.raises(ValidationError, match="twice"):
        DatasetSpec.model_validate(spec(features=["f0", "f0"]))
    with pytest.raises(ValidationError, match="directly under the data set's prefix"):
        DatasetSpec.model_validate(spec(expected_files=["a/b.csv"]))
    with pytest.raises(ValidationError, match="the declaration itself"):
        DatasetSpec.model_validate(spec(expected_files=["_dataset.json"]))
    with pytest.raises(ValidationError, match="listed more than once"):
        DatasetSpec.model_validate(spec(expected_files=["a.csv", "a.csv"]))


NAMES_USERS_HAVE = ["spaces in name.csv", "unicode_näme_数据.csv", ".hidden.csv", "données (v2).parquet", "x" * 1000 + ".csv"]


def test_every_object_name_that_stays_under_the_prefix_is_accepted():
    assert DatasetSpec.model_validate(spec(expected_files=NAMES_USERS_HAVE)).expected_files == NAMES_USERS_HAVE
    for name in NAMES_USERS_HAVE:
        assert split_object_name(f"iris/{name}") == ("iris", name)


def test_each_refused_name_is_reported_on_its_own():
    files = ["ok.csv", "a/b.csv", "ok two.csv", "..", "c\rd.csv", "ok.csv"]
    with pytest.raises(ValidationError) as caught:
        DatasetSpec.model_validate(spec(expected_files=files))
    assert [e["loc"] for e in caught.value.errors()] == [("expected_files", 1), ("expected_files", 3), ("expected_files", 4)]
    with pytest.raises(ValidationError, match="listed more than once: 'ok.csv'"):
        DatasetSpec.model_validate(spec(expected_files=["ok.csv", "b.csv", "ok.csv"]))


def test_the_object_name_limit_counts_the_data_sets_prefix():
    name = "y" * (MAX_OBJECT_NAME_BYTES - len("iris/"))
    assert DatasetSpec.model_validate(spec(expected_files=[name]), context={"dataset": "iris"}).expected_files == [name]
    with pytest.raises(ValidationError, match="1025 bytes"):
        DatasetSpec.model_validate(spec(expected_files=[name]), context={"dataset": "iris2"})
    assert split_object_name(f"iris/{name}") == ("iris", name)
    assert split_object_name(f"iris2/{name}") is None


def test_file_keys_are_valid_document_ids_and_distinct():
    names = [*NAMES_USERS_HAVE, "__x__", ".", "a.csv", "A.csv"]
    keys = [file_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 41 and k.isalnum() and k == file_key(n) for k, n in zip(keys, names))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("iris/a.csv", ("iris", "a.csv")),
        ("iris/_dataset.json", ("iris", "_dataset.json")),
        ("my-data_1.v2/part.parquet", ("my-data_1.v2", "part.parquet")),
        ("a.csv", None),
        ("iris/", None),
        ("iris/sub/a.csv", None),
        ("/a.csv", None),
        ("_iris/a.csv", None),
        (".iris/a.csv", None),
        ("", None),
        ("x" * 101 + "/a.csv", None),
        ("iris/spaces in name.csv", ("iris", "spaces in name.csv")),
        ("iris/..", None),
        ("iris/a\nb.csv", None),
    ],
)
def test_split_object_name(name, expected):
    assert split_object_name(name) == expected


# -- FeatureStats -------------------------------------------------------------


def merge_all(parts: list[FeatureStats]) -> FeatureStats:
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total


def test_merge_and_mean_std_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)) * [1.0, 50.0, 0.01] + [0.0, -3.0, 7.0]
    y = rng.integers(0, 3, size=100)
    merged = merge_all([stats_of(x[a:b], y[a:b]) for a, b in [(0, 17), (17, 60), (60, 100)]])
    assert merged.count == 100
    assert merged.label_counts == [int(v) for v in np.bincount(y, minlength=3)]
    np.testing.assert_allclose(merged.mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.m2, x.var(axis=0) * 100, rtol=1e-12)
    mean, std = merged.mean_std()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-12)


def test_merge_is_order_independent():
    assert STATS_A.merge(STATS_B) == STATS_B.merge(STATS_A)
    rng = np.random.default_rng(1)
    x = 1e4 + rng.normal(size=(120, 2)) * [1.0, 1e-2]
    y = rng.integers(0, 3, size=120)
    parts = [stats_of(x[a:b], y[a:b]) for a, b in [(0, 30), (30, 60), (60, 101), (101, 120)]]
    # Pairwise it is exact, equal counts included (parts 0 and 1 both have 30 rows).
    for i in range(len(parts)):
        for j in range(len(parts)):
            assert parts[i].merge(parts[j]) == parts[j].merge(parts[i])
    # Any order or grouping of several parts agrees to rounding: the part means carry
    # errors of an ulp of |mean|, so m2 agrees to ~eps * |mean| / std (here ~1e-10).
    reference = merge_all(parts)
    orders = [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]]
    results = [merge_all([parts[i] for i in order]) for order in orders]
    results.append(parts[0].merge(parts[1]).merge(parts[2].merge(parts[3])))
    results.append(parts[3].merge(parts[1]).merge(parts[0].merge(parts[2])))
    for other in results:
        assert other.count == reference.count and other.label_counts == reference.label_counts
        np.testing.assert_allclose(other.mean, reference.mean, rtol=1e-15)
        np.testing.assert_allclose(other.m2, reference.m2, rtol=1e-9)
    np.testing.assert_allclose(reference.mean_std()[1], x.std(axis=0), rtol=1e-9)


def test_constant_feature_has_std_one():
    x = np.column_stack([np.full(50, 3.3), np.arange(50.0)])
    mean, std = stats_of(x, np.zeros(50, dtype=int)).mean_std()
    assert mean[0] == pytest.approx(3.3)
    assert std[0] == 1.0
    assert std[1] == pytest.approx(np.arange(50.0).std())


@pytest.mark.parametrize("value", [98765.4321, -3.3e7, 1e12, 0.0, 1e-9])
def test_large_constant_feature_merged_from_halves_has_std_exactly_one(value):
    """sumsq/n - mean**2 gave std 0.00195 for 1000 rows of 98765.4321."""
    x = np.full((1000, 1), value)
    y = np.zeros(1000, dtype=int)
    halves = [stats_of(x[:500], y[:500]), stats_of(x[500:], y[500:])]
    for merged in (halves[0].merge(halves[1]), halves[1].merge(halves[0])):
        mean, std = merged.mean_std()
        assert merged.count == 1000
        assert mean[0] == pytest.approx(value, rel=1e-15)
        assert std == [1.0]


def test_large_mean_with_unit_spread_merged_from_three_parts_keeps_its_std():
    """sumsq/n - mean**2 gave std 2.0 for 1e8 + N(0, 1)."""
    rng = np.random.default_rng(3)
    x = (1e8 + rng.normal(size=1000))[:, None]
    y = rng.integers(0, 3, size=1000)
    parts = [stats_of(x[a:b], y[a:b]) for a, b in [(0, 123), (123, 600), (600, 1000)]]
    for merged in (merge_all(parts), merge_all(parts[::-1])):
        mean, std = merged.mean_std()
        assert mean[0] == pytest.approx(float(np.mean(x)), rel=1e-15)
        assert std[0] == pytest.approx(float(np.std(x)), rel=1e-6)


def test_small_spread_below_the_threshold_counts_as_constant():
    # std 1e-7 around 0 (absolute floor 1e-6) and std 1e-5 around 1e8 (relative 1e-12 * |mean| = 1e-4).
    tiny = FeatureStats(count=4, mean=[0.0, 1e8], m2=[4 * 1e-14, 4 * 1e-10], label_counts=[4, 0])
    assert tiny.mean_std()[1] == [1.0, 1.0]
    above = FeatureStats(count=4, mean=[0.0, 1e8], m2=[4 * 1e-10, 4 * 1e-6], label_counts=[4, 0])
    np.testing.assert_allclose(above.mean_std()[1], [1e-5, 1e-3], rtol=1e-12)


def test_merge_refuses_different_schemas():
    with pytest.raises(ValueError, match="different schemas"):
        STATS_A.merge(FeatureStats(count=1, mean=[1.0], m2=[0.0], label_counts=[1, 0, 0]))
    with pytest.raises(ValueError, match="different schemas"):
        STATS_A.merge(FeatureStats(count=1, mean=[1.0, 1.0], m2=[0.0, 0.0], label_counts=[1, 0]))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"count": 0}, id="no-rows"),
        pytest.param({"count": -1}, id="negative-count"),
        pytest.param({"m2": [1.0]}, id="m2-shorter-than-mean"),
        pytest.param({"m2": [-1.0, 0.0]}, id="negative-m2"),
        pytest.param({"mean": [float("nan"), 0.0]}, id="nan-mean"),
        pytest.param({"m2": [float("inf"), 0.0]}, id="inf-m2"),
        pytest.param({"label_counts": [-1, 2]}, id="negative-label-count"),
        pytest.param({"sum": [1.0, 2.0], "sumsq": [1.0, 4.0], "mean": None, "m2": None}, id="old-sum-sumsq-shape"),
    ],
)
def test_invalid_stats_are_refused(changes):
    fields = {"count": 1, "mean": [1.0, 2.0], "m2": [0.0, 0.0], "label_counts": [1, 0]}
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(ValidationError):
        FeatureStats.model_validate(fields)


def test_stats_survive_a_json_round_trip_exactly():
    stats = stats_of(np.random.default_rng(4).normal(size=(7, 2)) + 98765.4321, np.array([0, 1, 2, 0, 1, 2, 0]))
    assert FeatureStats.model_validate_json(stats.model_dump_json()) == stats
    assert FeatureStats.model_validate(stats.model_dump()) == stats


# -- shard-ready messages are checked against ingest's record ------------------


def genuine(file: str = "a b ü.csv", node: str = "us") -> tuple[ShardReady, bytes, FileRecord]:
    """A message as ingest publishes it, and the file record ingest wrote beside it."""
    import hashlib

    settings = Settings()
    prefix = f"gs://{settings.processed_bucket(node)}/{processed_prefix('iris', file, 7, 3)}"
    ready = ShardReady(node=node, dataset="iris", file=file, generation=7, spec_generation=3, source=f"gs://raw/iris/{file}",
                       rows=3, shards=[f"{prefix}/shard-00000.parquet"], stats=STATS_A)
    message = ready.model_dump_json().encode()
    record = FileRecord(name=file, generation=7, spec_generation=3, status="processed", updated_at=NOW,
                        manifest_sha256=hashlib.sha256(message).hexdigest())
    return ready, message, record


def test_the_message_ingest_wrote_is_accepted():
    ready, message, record = genuine()
    assert shard_ready_problem(Settings(), ready, message, record) is None
    assert shard_ready_problem(Settings(), ready, message, record.model_copy(update={"status": "publishing"})) is None


def _forged(ready: ShardReady, **changes) -> tuple[ShardReady, bytes]:
    forged = ready.model_copy(update=changes)
    return forged, forged.model_dump_json().encode()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        pytest.param({"shards": ["gs://fedpipe-local-eu-processed/iris/x/g7-s3/shard-00000.parquet"]}, "foreign_shards", id="another-nodes-bucket"),
        pytest.param({"node": "eu"}, "foreign_shards", id="claims-another-node"),
        pytest.param({"node": "mars"}, "unknown_node", id="unknown-node"),
        pytest.param({"dataset": "other"}, "foreign_shards", id="another-data-sets-prefix"),
        pytest.param({"generation": 8}, "foreign_shards", id="fake-generation"),
        pytest.param({"rows": 3000}, "not_from_ingest", id="inflated-rows"),
        pytest.param({"stats": STATS_B}, "not_from_ingest", id="other-stats"),
    ],
)
def test_a_message_that_differs_from_ingests_record_is_refused(changes, problem):
    ready, _, record = genuine()
    forged, message = _forged(ready, **changes)
    assert shard_ready_problem(Settings(), forged, message, record) == problem


def test_a_fake_generation_under_its_own_prefix_does_not_match_the_record():
    """The attack of issue 7: a made-up generation must not make a later genuine upload a duplicate."""
    ready, _, record = genuine()
    prefix = f"gs://{Settings().processed_bucket('us')}/{processed_prefix('iris', ready.file, 99, 3)}"
    forged, message = _forged(ready, generation=99, shards=[f"{prefix}/shard-00000.parquet"])
    assert shard_ready_problem(Settings(), forged, message, record) == "generation_mismatch"
    assert shard_ready_problem(Settings(), forged, message, None) == "no_such_upload"


def test_shards_must_lie_directly_under_the_uploads_prefix():
    ready, _, record = genuine()
    prefix = ready.shards[0].rsplit("/", 1)[0]
    for uri in (f"{prefix}/../../eu/shard.parquet", f"{prefix}-x/shard.parquet", prefix):
        forged, message = _forged(ready, shards=[uri])
        assert shard_ready_problem(Settings(), forged, message, record) == "foreign_shards", uri


# -- claims on an upload (shared.ingest.claim_decision) ------------------------


def test_claims_on_an_upload():
    from datetime import timedelta

    from shared.ingest import CLAIM_LEASE_S, Claim, claim_decision

    def decide(record: FileRecord | None, claimant: str = "e2", now=NOW) -> Claim:
        return claim_decision(record, generation=5, spec_generation=2, claimant=claimant, now=now)

    live = FileRecord(name="a.csv", generation=5, spec_generation=2, status="processing", claimed_by="e1", claimed_at=NOW, updated_at=NOW)

    def like(**changes) -> FileRecord:
        return live.model_copy(update=changes)

    assert decide(None) is Claim.CLAIMED
    assert claim_decision(None, 5, None, "e1", NOW) is Claim.AWAITING_DECLARATION
    assert decide(FileRecord(name="a.csv", generation=5, status="awaiting_declaration", updated_at=NOW)) is Claim.CLAIMED
    assert decide(like(generation=6)) is Claim.STALE
    assert decide(live) is Claim.BUSY  # a concurrent duplicate leaves it to the claimant
    assert decide(live, claimant="e1") is Claim.CLAIMED  # the claimant's own retry takes it back
    assert decide(live, now=NOW + timedelta(seconds=CLAIM_LEASE_S)) is Claim.CLAIMED  # a claimant that died for good
    assert decide(like(status="processed")) is Claim.DUPLICATE
    assert decide(like(status="quarantined")) is Claim.DUPLICATE
    assert decide(like(status="publishing")) is Claim.BUSY
    assert decide(like(status="publishing"), claimant="e1") is Claim.CLAIMED  # it may have died before publishing
    assert decide(like(status="processed"), claimant="e1") is Claim.DUPLICATE  # the same event delivered again
    assert decide(like(spec_generation=1, status="processed")) is Claim.CLAIMED  # a new declaration reprocesses
    assert decide(like(generation=4, status="processed")) is Claim.CLAIMED  # a new upload


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"dataset": "a/b"}, id="dataset-path"),
        pytest.param({"dataset": "x" * 5000}, id="huge-dataset"),
        pytest.param({"node": "us/../eu"}, id="node-path"),
        pytest.param({"file": "f" * 2000}, id="huge-file"),
        pytest.param({"shards": []}, id="no-shards"),
        pytest.param({"rows": 0}, id="no-rows"),
        pytest.param({"generation": 0}, id="no-generation"),
    ],
)
def test_shard_ready_messages_are_bounded(changes):
    ready, _, _ = genuine()
    with pytest.raises(ValidationError):
        ShardReady.model_validate({**ready.model_dump(), **changes})
