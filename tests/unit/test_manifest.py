"""shared.manifest (pure parts) and shared.datasets: versions, merged statistics, completion, declarations."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from shared.datasets import SPEC_OBJECT, DatasetSpec, FeatureStats, split_object_name
from shared.jobs import DatasetRef, JobStatus, TrainSpec
from shared.manifest import ShardReady, completion, dataset_doc_id, entry_of, merged_stats, version_of

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TRAIN = TrainSpec(model="logreg", hidden=(), epochs=7, batch_size=32, learning_rate=0.01, seed=3)
SPEC = DatasetSpec(features=["f0", "f1"], label="y", num_classes=3, expected_files=["a.csv", "b.csv"], train=TRAIN)


def stats_of(x: np.ndarray, y: np.ndarray, num_classes: int = 3) -> FeatureStats:
    return FeatureStats(
        count=len(x),
        sum=[float(v) for v in x.sum(axis=0)],
        sumsq=[float(v) for v in np.square(x).sum(axis=0)],
        label_counts=[int(v) for v in np.bincount(y, minlength=num_classes)],
    )


def entry(generation: int, stats: FeatureStats, name: str = "a.csv") -> dict:
    return {
        "generation": generation,
        "rows": stats.count,
        "shards": [f"iris/{name}/{generation}/shard-00000.parquet"],
        "stats": stats.model_dump(),
        "source": f"gs://fedpipe-local-us-raw/iris/{name}",
    }


STATS_A = FeatureStats(count=3, sum=[1.0, 2.0], sumsq=[3.0, 4.0], label_counts=[1, 1, 1])
STATS_B = FeatureStats(count=5, sum=[10.0, -2.0], sumsq=[30.0, 40.0], label_counts=[2, 0, 3])


def dataset_doc(**extra) -> dict:
    return {"node": "us", "dataset": "iris", "spec": SPEC.model_dump(), **extra}


# -- version_of / merged_stats ------------------------------------------------


def test_version_is_order_independent():
    one = {"a.csv": {"generation": 1}, "b.csv": {"generation": 2}}
    other = {"b.csv": {"generation": 2}, "a.csv": {"generation": 1}}
    assert list(one) != list(other)
    assert version_of(one) == version_of(other)
    assert len(version_of(one)) == 10
    assert all(c in "0123456789abcdef" for c in version_of(one))


def test_version_changes_with_a_generation():
    base = {"a.csv": {"generation": 1}, "b.csv": {"generation": 2}}
    assert version_of(base) != version_of({**base, "b.csv": {"generation": 3}})
    assert version_of(base) != version_of({"a.csv": {"generation": 2}, "b.csv": {"generation": 1}})


def test_version_ignores_other_fields():
    assert version_of({"a.csv": {"generation": 1, "rows": 5}}) == version_of({"a.csv": {"generation": 1, "rows": 9}})


def test_merged_stats_equals_a_merge_by_hand():
    files = {"b.csv": entry(2, STATS_B, "b.csv"), "a.csv": entry(1, STATS_A)}
    merged = merged_stats(files)
    assert merged == STATS_A.merge(STATS_B)
    assert merged == FeatureStats(count=8, sum=[11.0, 0.0], sumsq=[33.0, 44.0], label_counts=[3, 1, 4])


def test_merged_stats_of_one_file_is_that_file():
    assert merged_stats({"a.csv": entry(1, STATS_A)}) == STATS_A


def test_dataset_doc_id():
    assert dataset_doc_id("us", "iris") == "us~iris"


def test_entry_of_a_shard_ready_message():
    ready = ShardReady(node="us", dataset="iris", file="a.csv", generation=5, source="gs://b/iris/a.csv",
                       rows=3, shards=["s0"], stats=STATS_A)
    assert entry_of(ready) == {"generation": 5, "rows": 3, "shards": ["s0"], "stats": STATS_A.model_dump(), "source": "gs://b/iris/a.csv"}


# -- completion ---------------------------------------------------------------


def test_incomplete_data_set_has_no_job():
    assert completion(dataset_doc(), {}, NOW) is None
    assert completion(dataset_doc(), {"a.csv": entry(1, STATS_A)}, NOW) is None
    # A file that is not expected does not stand in for a missing one.
    assert completion(dataset_doc(), {"a.csv": entry(1, STATS_A), "c.csv": entry(1, STATS_B, "c.csv")}, NOW) is None


def test_complete_data_set_gives_summary_and_job():
    entries = {"a.csv": entry(11, STATS_A), "b.csv": entry(22, STATS_B, "b.csv")}
    outcome = completion(dataset_doc(), entries, NOW)
    assert outcome is not None
    summary, job = outcome
    version = version_of(entries)
    assert job.id == f"train-us-iris-{version}"
    assert job.status is JobStatus.PENDING and job.attempt == 1
    assert job.created_at == NOW
    assert job.spec.dataset == DatasetRef(node="us", dataset="iris")
    assert job.spec.train == TRAIN
    assert summary["status"] == "complete"
    assert summary["version"] == version
    assert summary["job_id"] == job.id
    assert summary["rows"] == STATS_A.count + STATS_B.count == 8
    assert summary["stats"] == STATS_A.merge(STATS_B).model_dump()
    assert summary["files"] == entries
    assert summary["completed_at"] == NOW and summary["updated_at"] == NOW


def test_extra_entries_are_left_out_of_the_summary():
    entries = {"a.csv": entry(1, STATS_A), "b.csv": entry(2, STATS_B, "b.csv"), "old.csv": entry(9, STATS_A, "old.csv")}
    summary, job = completion(dataset_doc(), entries, NOW)
    assert set(summary["files"]) == {"a.csv", "b.csv"}
    assert summary["rows"] == 8
    assert job.id == f"train-us-iris-{version_of({k: entries[k] for k in ('a.csv', 'b.csv')})}"


def test_already_recorded_version_has_no_new_job():
    entries = {"a.csv": entry(1, STATS_A), "b.csv": entry(2, STATS_B, "b.csv")}
    summary, _ = completion(dataset_doc(), entries, NOW)
    assert completion(dataset_doc(**summary), entries, NOW) is None


def test_new_generation_of_a_file_makes_a_new_job():
    entries = {"a.csv": entry(1, STATS_A), "b.csv": entry(2, STATS_B, "b.csv")}
    summary, first = completion(dataset_doc(), entries, NOW)
    changed = {**entries, "b.csv": entry(3, STATS_B, "b.csv")}
    outcome = completion(dataset_doc(**summary), changed, NOW)
    assert outcome is not None
    new_summary, second = outcome
    assert second.id != first.id
    assert second.id == f"train-us-iris-{version_of(changed)}"
    assert new_summary["version"] != summary["version"]


def test_same_content_gives_the_same_job_id():
    entries = {"a.csv": entry(1, STATS_A), "b.csv": entry(2, STATS_B, "b.csv")}
    _, one = completion(dataset_doc(), entries, NOW)
    _, two = completion(dataset_doc(), dict(reversed(list(entries.items()))), datetime(2025, 1, 1, tzinfo=UTC))
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
        pytest.param({"expected_files": [".hidden"]}, id="leading-dot"),
        pytest.param({"features": []}, id="no-features"),
        pytest.param({"num_classes": 1}, id="one-class"),
        pytest.param({"shard_rows": 0}, id="zero-shard-rows"),
        pytest.param({"train": {"epochs": 0}}, id="bad-train"),
    ],
)
def test_invalid_specs_are_refused(changes):
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate(spec(**changes))


def test_spec_error_messages_name_the_problem():
    with pytest.raises(ValidationError, match="also listed as a feature"):
        DatasetSpec.model_validate(spec(label="f1"))
    with pytest.raises(ValidationError, match="twice"):
        DatasetSpec.model_validate(spec(features=["f0", "f0"]))
    with pytest.raises(ValidationError, match="plain file name"):
        DatasetSpec.model_validate(spec(expected_files=["a/b.csv"]))
    with pytest.raises(ValidationError, match="plain file name"):
        DatasetSpec.model_validate(spec(expected_files=["_dataset.json"]))
    with pytest.raises(ValidationError, match="lists a file twice"):
        DatasetSpec.model_validate(spec(expected_files=["a.csv", "a.csv"]))


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
    ],
)
def test_split_object_name(name, expected):
    assert split_object_name(name) == expected


# -- FeatureStats -------------------------------------------------------------


def test_merge_and_mean_std_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)) * [1.0, 50.0, 0.01] + [0.0, -3.0, 7.0]
    y = rng.integers(0, 3, size=100)
    parts = [(x[:17], y[:17]), (x[17:60], y[17:60]), (x[60:], y[60:])]
    merged = stats_of(*parts[0])
    for px, py in parts[1:]:
        merged = merged.merge(stats_of(px, py))
    whole = stats_of(x, y)
    assert merged.count == 100
    assert merged.label_counts == [int(v) for v in np.bincount(y, minlength=3)]
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.sumsq, whole.sumsq, rtol=1e-12)
    mean, std = merged.mean_std()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-7)


def test_merge_is_order_independent():
    assert STATS_A.merge(STATS_B) == STATS_B.merge(STATS_A)


def test_constant_feature_has_std_one():
    x = np.column_stack([np.full(50, 3.3), np.arange(50.0)])
    mean, std = stats_of(x, np.zeros(50, dtype=int)).mean_std()
    assert mean[0] == pytest.approx(3.3)
    assert std[0] == 1.0
    assert std[1] == pytest.approx(np.arange(50.0).std())


def test_merge_refuses_different_schemas():
    with pytest.raises(ValueError, match="different schemas"):
        STATS_A.merge(FeatureStats(count=1, sum=[1.0], sumsq=[1.0], label_counts=[1, 0, 0]))
    with pytest.raises(ValueError, match="different schemas"):
        STATS_A.merge(FeatureStats(count=1, sum=[1.0, 1.0], sumsq=[1.0, 1.0], label_counts=[1, 0]))
