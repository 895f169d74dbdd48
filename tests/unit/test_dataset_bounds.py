"""Every input of ingest is bounded (issue 8, part 6): one test per case, each trying to break its rule."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from shared.datasets import (
    DATASET_NAME,
    DECLARATION_BUDGET,
    MAX_COLUMN_NAME,
    MAX_EXPECTED_FILES,
    MAX_FEATURES,
    MAX_OBJECT_NAME_BYTES,
    DatasetSpec,
    file_key,
    split_object_name,
)
from shared.jobs import NODE_NAME
from shared.quarantine import QuarantineRecord, object_source

pytestmark = pytest.mark.unit


def spec(**changes) -> dict:
    return {"features": ["f0", "f1"], "label": "y", "num_classes": 2, "expected_files": ["a.csv"], **changes}


# -- object names are refused before they become document ids ------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ds/" + "x" * (MAX_OBJECT_NAME_BYTES - 2), id="over-1024-bytes"),
        pytest.param("ds/a\nb.csv", id="newline"),
        pytest.param("ds/a\x00b.csv", id="nul"),
        pytest.param("ds/a\x7fb.csv", id="delete"),
        pytest.param("ds/sub/a.csv", id="slash"),
        pytest.param("ds/.", id="dot"),
        pytest.param("ds/..", id="dot-dot"),
        pytest.param("__x__/a.csv", id="reserved-id-as-data-set"),
        pytest.param("ds/\ud800.csv", id="not-utf8"),
        pytest.param("ds\n/a.csv", id="data-set-with-trailing-newline"),
        pytest.param("ds/", id="no-file"),
        pytest.param("a.csv", id="no-data-set"),
    ],
)
def test_object_names_outside_the_layout_are_refused(name):
    assert split_object_name(name) is None


def test_a_reserved_looking_file_name_is_a_file_whose_id_is_a_digest():
    assert split_object_name("ds/__x__") == ("ds", "__x__")
    assert re.fullmatch(r"f[0-9a-f]{40}", file_key("__x__"))


def test_a_record_of_an_over_long_name_is_bounded_and_tells_names_apart():
    long, other = "ds/" + "x" * 5000, "ds/" + "x" * 4999 + "y"
    shown = object_source("b", long)
    assert len(shown) < 300 and shown.startswith("gs://b/ds/xxx") and object_source("b", other) != shown
    assert object_source("b", "ds/a.csv") == "gs://b/ds/a.csv"
    with pytest.raises(ValidationError):
        QuarantineRecord(node="us", source="gs://b/" + "x" * 5000, reason="bad_path", detail="", at="2024-01-01T00:00:00Z")


# -- generated ids cannot collide -----------------------------------------------------------


def test_the_data_set_id_separator_occurs_in_no_node_or_data_set_name():
    """DatasetRef.id is f'{node}~{dataset}': unique as long as neither name can hold '~'."""
    assert not re.fullmatch(NODE_NAME, "a~b") and not re.fullmatch(DATASET_NAME, "a~b")
    assert split_object_name("a~b/x.csv") is None


def test_file_keys_of_distinct_names_differ():
    names = ["a.csv", "A.csv", "a.csv ", "a.csv\u200b", "ａ.csv"]
    assert len({file_key(n) for n in names}) == len(names)


# -- every number of a declaration has a finite range -----------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"num_classes": 10_001}, id="num-classes"),
        pytest.param({"shard_rows": 2**63}, id="shard-rows"),
        pytest.param({"features": [f"f{i}" for i in range(MAX_FEATURES + 1)]}, id="feature-count"),
        pytest.param({"features": ["f" * (MAX_COLUMN_NAME + 1)]}, id="feature-name-length"),
        pytest.param({"label": "y" * (MAX_COLUMN_NAME + 1)}, id="label-length"),
        pytest.param({"expected_files": [f"{i}.csv" for i in range(MAX_EXPECTED_FILES + 1)]}, id="expected-files-count"),
        pytest.param({"features": [""]}, id="empty-feature-name"),
    ],
)
def test_a_number_beyond_its_range_is_refused(changes):
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate(spec(**changes))


def test_a_declaration_whose_record_would_not_fit_a_document_is_refused_with_its_size():
    files = [f"{i:04d}-" + "n" * 200 + ".csv" for i in range(MAX_EXPECTED_FILES)]
    with pytest.raises(ValidationError, match=f"the limit is {DECLARATION_BUDGET}"):
        DatasetSpec.model_validate(spec(expected_files=files))
    wide = [f"f{i}" for i in range(2000)]
    with pytest.raises(ValidationError, match="2000 features"):
        DatasetSpec.model_validate(spec(features=wide, expected_files=[f"{i}.csv" for i in range(10)]))
    assert DatasetSpec.model_validate(spec(features=wide)).max_shards_per_file == 1333  # one file: every shard is its


def test_every_file_of_a_declaration_may_make_at_least_one_shard():
    many = DatasetSpec.model_validate(spec(expected_files=[f"{i}.csv" for i in range(MAX_EXPECTED_FILES)]))
    assert many.max_shards_per_file == 1
