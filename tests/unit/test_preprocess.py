"""shared.preprocess: every bad file becomes RejectedFile, good files become exact shards."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from shared.datasets import DatasetSpec
from shared.preprocess import ProcessedFile, RejectedFile, preprocess_file, read_shard

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent.parent / "data" / "preprocess"
MAX = 1 << 20
PARSE_REASONS = {"unparseable", "missing_columns", "null_values", "non_numeric", "bad_label", "no_rows"}
# shard_rows below what a declaration may ask for (64), so small tables still make several shards
SPEC = DatasetSpec(features=["f0", "f1", "f2"], label="y", num_classes=3, expected_files=["a.csv"]).model_copy(update={"shard_rows": 4})


def make_table(rows: int = 10, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)) * [1.0, 100.0, 0.01]
    y = rng.integers(0, 3, size=rows)
    return pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "y": y})


def to_csv(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pcsv.write_csv(table, sink)
    return sink.getvalue()


def to_parquet(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def rejected(data: bytes, name: str = "a.csv", spec: DatasetSpec = SPEC, max_bytes: int = MAX) -> RejectedFile:
    with pytest.raises(RejectedFile) as info:
        preprocess_file(data, name, spec, max_bytes)
    return info.value


def xy(table: pa.Table, spec: DatasetSpec = SPEC) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([table.column(f).to_numpy().astype(np.float64) for f in spec.features])
    return x, table.column(spec.label).to_numpy()


# --- good files -------------------------------------------------------------------------


def test_shards_have_at_most_shard_rows_and_cover_all_rows() -> None:
    out = preprocess_file(to_csv(make_table(10)), "a.csv", SPEC, MAX)
    assert out.rows == 10
    assert [pq.read_metadata(pa.BufferReader(s)).num_rows for s in out.shards] == [4, 4, 2]


def test_exact_multiple_and_single_shard() -> None:
    eight = preprocess_file(to_csv(make_table(8)), "a.csv", SPEC, MAX)
    assert [len(read_shard(s, SPEC)[1]) for s in eight.shards] == [4, 4]
    big = SPEC.model_copy(update={"shard_rows": 4096})
    assert len(preprocess_file(to_csv(make_table(10)), "a.csv", big, MAX).shards) == 1


def test_round_trip_through_read_shard_equals_input() -> None:
    table = make_table(10)
    out = preprocess_file(to_parquet(table), "a.parquet", SPEC, MAX)
    parts = [read_shard(s, SPEC) for s in out.shards]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x_in, y_in = xy(table)
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (10, 3)
    np.testing.assert_array_equal(x, x_in.astype(np.float32))
    np.testing.assert_array_equal(y, y_in)


def test_shard_schema_is_float32_features_then_int32_label() -> None:
    out = preprocess_file(to_csv(make_table(5)), "a.csv", SPEC, MAX)
    schema = pq.read_schema(pa.BufferReader(out.shards[0]))
    assert schema.names == ["f0", "f1", "f2", "y"]
    assert schema.types == [pa.float32()] * 3 + [pa.int32()]


def test_stats_equal_numpy_mean_and_m2() -> None:
    table = make_table(10)
    stats = preprocess_file(to_csv(table), "a.csv", SPEC, MAX).stats
    x, y = xy(table)
    assert stats.count == 10
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.m2, x.var(axis=0) * 10, rtol=1e-12)
    assert stats.label_counts == np.bincount(y, minlength=3).tolist()
    mean, std = stats.mean_std()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-12)


def test_stats_of_file_parts_merge_precisely_when_mean_dwarfs_spread() -> None:
    """A constant column far from zero, and 1e8 + N(0, 1): sumsq/n - mean**2 got both wrong."""
    rows = 999
    rng = np.random.default_rng(7)
    x = np.column_stack([np.full(rows, 98765.4321), 1e8 + rng.normal(size=rows), rng.normal(size=rows)])
    y = rng.integers(0, 3, size=rows)
    table = pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "y": y})
    cuts = [(0, 300), (300, 700), (700, rows)]
    parts = [preprocess_file(to_parquet(table.slice(a, b - a)), "a.parquet", SPEC, MAX).stats for a, b in cuts]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == rows
    assert merged.label_counts == np.bincount(y, minlength=3).tolist()
    mean, std = merged.mean_std()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-13, atol=1e-15)
    assert mean[0] == pytest.approx(98765.4321, rel=1e-15)
    assert std[0] == 1.0
    np.testing.assert_allclose(std[1:], x[:, 1:].std(axis=0), rtol=1e-6)


def test_label_counts_has_num_classes_entries_even_when_classes_absent() -> None:
    table = pa.table({"f0": [1.0, 2.0], "f1": [0.0, 0.0], "f2": [3.0, 3.0], "y": [1, 1]})
    spec = SPEC.model_copy(update={"num_classes": 5})
    assert preprocess_file(to_csv(table), "a.csv", spec, MAX).stats.label_counts == [0, 2, 0, 0, 0]


def test_csv_and_parquet_of_the_same_table_give_identical_results() -> None:
    table = make_table(10)
    from_csv = preprocess_file(to_csv(table), "a.csv", SPEC, MAX)
    from_pq = preprocess_file(to_parquet(table), "a.pq", SPEC, MAX)
    assert from_csv.stats == from_pq.stats
    assert from_csv.shards == from_pq.shards


def test_csv_gz_matches_csv() -> None:
    raw = to_csv(make_table(10))
    plain = preprocess_file(raw, "a.csv", SPEC, MAX)
    gz = preprocess_file(gzip.compress(raw, mtime=0), "A.CSV.GZ", SPEC, MAX)
    assert gz == plain


@pytest.mark.parametrize("name", ["a.csv", "a.parquet"])
def test_deterministic_bytes(name: str) -> None:
    table = make_table(10)
    data = to_csv(table) if name.endswith(".csv") else to_parquet(table)
    first, second = preprocess_file(data, name, SPEC, MAX), preprocess_file(bytes(data), name, SPEC, MAX)
    assert first.shards == second.shards and first.stats == second.stats


def test_extra_columns_dropped_and_order_follows_spec() -> None:
    csv = b"note,f2,y,junk,f1,f0\nhello,3,2,,2,1\n,6,0,x,5,4\n"
    out = preprocess_file(csv, "a.csv", SPEC, MAX)
    assert pq.read_schema(pa.BufferReader(out.shards[0])).names == ["f0", "f1", "f2", "y"]
    x, y = read_shard(out.shards[0], SPEC)
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(y, [2, 0])


def test_float_labels_that_are_integers_are_accepted() -> None:
    csv = b"f0,f1,f2,y\n1,2,3,1.0\n4,5,6,2e0\n7,8,9,0\n"
    assert preprocess_file(csv, "a.csv", SPEC, MAX).stats.label_counts == [1, 1, 1]
    table = pa.table({"f0": [1.0], "f1": [2.0], "f2": [3.0], "y": [2.0]})
    assert preprocess_file(to_parquet(table), "a.parquet", SPEC, MAX).stats.label_counts == [0, 0, 1]


def test_parquet_integer_and_float32_columns_and_many_row_groups() -> None:
    table = pa.table(
        {
            "f0": pa.array(range(10), pa.int16()),
            "f1": pa.array(np.linspace(0, 1, 10), pa.float32()),
            "f2": pa.array(range(10), pa.uint8()),
            "y": pa.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], pa.int64()),
        }
    )
    out = preprocess_file(to_parquet(table, row_group_size=3), "a.parquet", SPEC, MAX)
    x = np.concatenate([read_shard(s, SPEC)[0] for s in out.shards])
    np.testing.assert_array_equal(x[:, 0], np.arange(10))
    np.testing.assert_array_equal(x[:, 1], np.linspace(0, 1, 10).astype(np.float32))
    assert out.stats.label_counts == [4, 3, 3]


def test_messy_but_valid_csv_golden_file() -> None:
    """BOM, CRLF, quoted header and cells, padded number, quoted newline, empty extra cell."""
    spec = SPEC.model_copy(update={"features": ["f0", "f1"]})
    out = preprocess_file((DATA / "messy.csv").read_bytes(), "messy.csv", spec, MAX)
    x, y = read_shard(out.shards[0], spec)
    np.testing.assert_array_equal(x, np.array([[10, 0.5], [3, -2.25], [-0.125, 4]], np.float32))
    np.testing.assert_array_equal(y, [1, 0, 2])
    assert out.stats.mean == [12.875 / 3, 0.75]
    assert out.stats.m2 == pytest.approx([(10 - 12.875 / 3) ** 2 + (3 - 12.875 / 3) ** 2 + (-0.125 - 12.875 / 3) ** 2, 19.625])


def test_breast_cancer_data_set() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_breast_cancer()  # as_frame=True would need pandas, which we do not ship
    names = [str(n) for n in bunch.feature_names]
    table = pa.table({**{n: bunch.data[:, j] for j, n in enumerate(names)}, "target": bunch.target})
    spec = DatasetSpec(features=names, label="target", num_classes=2, expected_files=["bc.csv"], shard_rows=100)
    out = preprocess_file(to_csv(table), "bc.csv", spec, 10 * MAX)
    assert out.rows == 569 and len(out.shards) == 6
    assert out.stats.label_counts == [212, 357]
    np.testing.assert_allclose(out.stats.mean, bunch.data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out.stats.m2, bunch.data.var(axis=0) * 569, rtol=1e-9)
    x = np.concatenate([read_shard(s, spec)[0] for s in out.shards])
    np.testing.assert_allclose(x, bunch.data, rtol=1e-6)


# --- rejected files ---------------------------------------------------------------------


def test_str_is_reason_colon_detail() -> None:
    exc = rejected(b"", "a.csv")
    assert (exc.reason, str(exc)) == ("empty", f"empty: {exc.detail}")
    assert "\n" not in rejected(b"PAR1garbage", "a.parquet").detail


def test_too_large_is_checked_before_parsing() -> None:
    assert rejected(b"not even a csv, but big", "a.csv", max_bytes=10).reason == "too_large"
    assert rejected(b"x" * 11, "a.exe", max_bytes=10).reason == "too_large"
    assert preprocess_file(to_csv(make_table(2)), "a.csv", SPEC, len(to_csv(make_table(2)))).rows == 2


def test_gzip_bomb_is_too_large() -> None:
    data = b"f0,f1,f2,y\n" + b"1,2,3,0\n" * 100_000
    exc = rejected(gzip.compress(data), "a.csv.gz", max_bytes=100_000)
    assert exc.reason == "too_large" and "decompressed" in exc.detail


@pytest.mark.parametrize("name", ["a.csv", "a.parquet", "a.csv.gz", "a.txt"])
def test_empty(name: str) -> None:
    assert rejected(b"", name).reason == "empty"


@pytest.mark.parametrize("name", ["a.txt", "a.json", "a.gz", "a.parquet.gz", "a", "csv", "a.csv.bak"])
def test_unsupported_format(name: str) -> None:
    assert rejected(b"f0,f1,f2,y\n1,2,3,0\n", name).reason == "unsupported_format"


@pytest.mark.parametrize(
    "name,data",
    [
        ("a.csv", np.random.default_rng(1).bytes(2000)),
        ("a.parquet", np.random.default_rng(2).bytes(2000)),
        ("a.csv.gz", np.random.default_rng(3).bytes(2000)),
        ("a.csv", b"f0,f1,f2,y\n1,2,3,0\n4,5\n"),
        ("a.csv", b"f0,f1,\xff\xfe,y\n1,2,3,0\n"),
        ("a.parquet", b"f0,f1,f2,y\n1,2,3,0\n"),
        ("a.csv", to_parquet(make_table(5))),
    ],
    ids=["garbage-csv", "garbage-parquet", "garbage-gz", "ragged-csv", "bad-utf8", "csv-as-pq", "pq-as-csv"],
)
def test_unparseable(name: str, data: bytes) -> None:
    assert rejected(data, name).reason == "unparseable"


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_parquet_is_unparseable(cut: float) -> None:
    data = to_parquet(make_table(50))
    assert rejected(data[: int(len(data) * cut)], "a.parquet").reason == "unparseable"


@pytest.mark.parametrize("seed", range(25))
def test_corrupted_bytes_never_escape_as_other_exceptions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, good in [("a.parquet", to_parquet(make_table(30))), ("a.csv", to_csv(make_table(30)))]:
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[pos] = int(rng.integers(0, 256))
        try:
            out = preprocess_file(bytes(data), name, SPEC, MAX)
        except RejectedFile as exc:
            assert exc.reason in PARSE_REASONS
        else:
            assert isinstance(out, ProcessedFile) and out.stats.count == out.rows


def test_missing_columns_lists_all_of_them() -> None:
    assert rejected(b"   \n\n").reason == "missing_columns"  # a blank line is a header with one column
    exc = rejected(b"f0,f2,other\n1,2,3\n")
    assert exc.reason == "missing_columns"
    assert "'f1'" in exc.detail and "'y'" in exc.detail and "'f0'" not in exc.detail
    table = pa.table({"f0": [1.0], "f1": [1.0], "label": [0]})
    exc = rejected(to_parquet(table), "a.parquet")
    assert exc.reason == "missing_columns" and "'f2'" in exc.detail and "'y'" in exc.detail


def test_null_values_name_column_and_first_row() -> None:
    exc = rejected(b"f0,f1,f2,y\n1,2,3,0\n4,5,6,1\n7,,9,2\n10,,12,0\n")
    assert exc.reason == "null_values" and "'f1'" in exc.detail and "row 3" in exc.detail
    exc = rejected(b'f0,f1,f2,y\n1,2,3,0\n4,5,6,""\n')
    assert exc.reason == "null_values" and "'y'" in exc.detail and "row 2" in exc.detail
    table = pa.table({"f0": [1.0, None], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": [0, 1]})
    exc = rejected(to_parquet(table), "a.parquet")
    assert exc.reason == "null_values" and "'f0'" in exc.detail and "row 2" in exc.detail


def test_null_reported_before_non_numeric() -> None:
    assert rejected(b"f0,f1,f2,y\n1,abc,3,0\n4,5,,1\n").reason == "null_values"


@pytest.mark.parametrize(
    "csv,column,row,kind,value",
    [
        (b"f0,f1,f2,y\n1,2,3,0\n4,5,6,1\n7,abc,9,2\n", "f1", 3, "not a number", "abc"),
        (b"f0,f1,f2,y\n1,2,3,0\nNA,5,6,1\n", "f0", 2, "not a number", "NA"),
        (b"f0,f1,f2,y\n1,2,3,0\n4,5,NaN,1\n", "f2", 2, "not a finite float32 (NaN)", "nan"),
        (b"f0,f1,f2,y\n1,2,3,0\n4,5,6,1\n-inf,5,6,1\n", "f0", 3, "not a finite float32 (infinite)", "-inf"),
        (b"f0,f1,f2,y\n1,2,7.25e300,0\n", "f2", 1, "not a finite float32 (beyond the float32 range)", "7.25"),
        (b"f0,f1,f2,y\n1,2,3,cat\n", "y", 1, "not a number", "cat"),
    ],
    ids=["text", "NA", "nan", "inf", "float32-overflow", "text-label"],
)
def test_non_numeric_csv(csv: bytes, column: str, row: int, kind: str, value: str) -> None:
    """Column, row and the kind of problem; never the cell itself (it may be personal data)."""
    exc = rejected(csv)
    assert exc.reason == "non_numeric"
    assert exc.detail == f"column '{column}' row {row}: {kind}"
    assert value not in exc.detail


def test_non_numeric_parquet() -> None:
    nan = pa.table({"f0": [1.0, 2.0], "f1": [1.0, float("nan")], "f2": [1.0, 2.0], "y": [0, 1]})
    exc = rejected(to_parquet(nan), "a.parquet")
    assert exc.reason == "non_numeric" and "'f1'" in exc.detail and "row 2" in exc.detail
    text = pa.table({"f0": ["1.0"], "f1": [1.0], "f2": [1.0], "y": [0]})
    exc = rejected(to_parquet(text), "a.parquet")
    assert exc.reason == "non_numeric" and "'f0'" in exc.detail and "string" in exc.detail


@pytest.mark.parametrize(
    "label,kind",
    [
        (b"3", "too large"),
        (b"-1", "negative"),
        (b"1.5", "not a whole number"),
        (b"7e3", "too large"),
        (b"inf", "not finite"),
        (b"2.0000001", "not a whole number"),
    ],
)
def test_bad_label_csv(label: bytes, kind: str) -> None:
    exc = rejected(b"f0,f1,f2,y\n1,2,3,0\n4,5,6," + label + b"\n")
    assert exc.reason == "bad_label"
    assert exc.detail == f"column 'y' row 2: not an integer in [0, 3) ({kind})"


def test_bad_label_parquet() -> None:
    table = pa.table({"f0": [1.0, 2.0], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": [0.0, 2.5]})
    exc = rejected(to_parquet(table), "a.parquet")
    assert exc.reason == "bad_label" and exc.detail == "column 'y' row 2: not an integer in [0, 3) (not a whole number)"
    ints = table.set_column(3, "y", pa.array([0, 3]))
    assert rejected(to_parquet(ints), "a.parquet").reason == "bad_label"


def test_no_rows() -> None:
    assert rejected(b"f0,f1,f2,y\n").reason == "no_rows"
    assert rejected(b"f0,f1,f2,y").reason == "no_rows"
    assert rejected(b"f0,f1,f2,y\n", "a.csv.gz").reason == "unparseable"  # not gzip at all
    assert rejected(gzip.compress(b"f0,f1,f2,y\n"), "a.csv.gz").reason == "no_rows"
    assert rejected(to_parquet(make_table(0)), "a.parquet").reason == "no_rows"


def test_import_is_light() -> None:
    code = "import sys, shared.preprocess; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- refusals never quote the data (issue 8) --------------------------------------------

SECRET = "SECRET-123-45-6789"
SECRET_NUMBER = 123456789  # distinctive digits, as a label or inside a float

_SECRET_CSVS = {
    "text-in-feature": (f"f0,f1,f2,y\n1,2,3,0\n4,{SECRET},6,1\n", "non_numeric", "column 'f1' row 2: not a number"),
    "text-in-label": (f"f0,f1,f2,y\n1,2,3,0\n4,5,6,{SECRET}\n", "non_numeric", "column 'y' row 2: not a number"),
    "too-few-cells": (f"f0,f1,f2,y\n1,2,3,0\n4,{SECRET}\n", "unparseable", "csv: row 2 has 2 cells; the header has 4"),
    "too-many-cells": (f"f0,f1,f2,y\n1,2,3,0\n7,8,9,1\n4,5,6,1,{SECRET}\n", "unparseable", "csv: row 3 has 5 cells; the header has 4"),
    "label-out-of-range": (f"f0,f1,f2,y\n1,2,3,{SECRET_NUMBER}\n", "bad_label", "column 'y' row 1: not an integer in [0, 3) (too large)"),
    "float32-overflow": (f"f0,f1,f2,y\n1,2,3,0\n{SECRET_NUMBER}e300,2,3,0\n", "non_numeric", None),
}


def _assert_no_secret(exc: RejectedFile) -> None:
    for text in (exc.detail, str(exc), *exc.problems):
        assert "SECRET" not in text.upper() and "23456789" not in text  # the digits also as a float's repr shows them


@pytest.mark.parametrize("gz", [False, True], ids=["csv", "csv.gz"])
@pytest.mark.parametrize("case", list(_SECRET_CSVS))
def test_csv_refusals_name_column_row_and_kind_never_the_cell(case: str, gz: bool) -> None:
    text, reason, detail = _SECRET_CSVS[case]
    data = text.encode()
    exc = rejected(gzip.compress(data, mtime=0) if gz else data, "a.csv.gz" if gz else "a.csv")
    _assert_no_secret(exc)
    assert exc.reason == reason
    if detail is not None:
        assert exc.detail == detail


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(b"f0,f1,f2,y\n1,2,3,0\n4,5," + SECRET.encode() + b"\xff\xfe,1\n", id="non-utf8-cell"),
        pytest.param(b"f0,f1,f2,y\n1,2,3,0\n\"4," + SECRET.encode() + b",5\n", id="open-quote"),
        pytest.param(b"f0,f1,\xff" + SECRET.encode() + b",y\n1,2,3,0\n", id="non-utf8-header"),
    ],
)
def test_csv_parse_failures_never_quote_the_file(case: bytes) -> None:
    _assert_no_secret(rejected(case))


@pytest.mark.parametrize(
    "table,reason",
    [
        (pa.table({"f0": [1.0, 2.0], "f1": ["1", SECRET], "f2": [1.0, 2.0], "y": [0, 1]}), "non_numeric"),
        (pa.table({"f0": [1.0, 2.0], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": ["0", SECRET]}), "non_numeric"),
        (pa.table({"f0": [1.0, 2.0], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": [0, SECRET_NUMBER]}), "bad_label"),
        (pa.table({"f0": [1.0, 2.0], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": [0.0, SECRET_NUMBER + 0.5]}), "bad_label"),
        (pa.table({"f0": [1.0, SECRET_NUMBER * 1e300], "f1": [1.0, 2.0], "f2": [1.0, 2.0], "y": [0, 1]}), "non_numeric"),
    ],
    ids=["text-feature", "text-label", "label-out-of-range", "fractional-label", "float32-overflow"],
)
def test_parquet_refusals_never_quote_the_cell(table: pa.Table, reason: str) -> None:
    exc = rejected(to_parquet(table), "a.parquet")
    _assert_no_secret(exc)
    assert exc.reason == reason
    assert "row 2" in exc.detail or "type string" in exc.detail


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_damaged_parquet_never_quotes_the_file(cut: float) -> None:
    table = pa.table({"f0": [1.0] * 50, "f1": [2.0] * 50, "f2": [3.0] * 50, "y": [0] * 50, "note": [SECRET] * 50})
    data = bytearray(to_parquet(table, compression="none"))
    start = int(len(data) * cut)
    data[start : start + 16] = b"\xff" * 16
    try:
        preprocess_file(bytes(data), "a.parquet", SPEC, MAX)
    except RejectedFile as exc:
        _assert_no_secret(exc)


# --- sizes are bounded before decoding (issue 8) -----------------------------------------


def _zeros(rows: int) -> pa.Table:
    zeros = pa.array(np.zeros(rows))
    return pa.table({"f0": zeros, "f1": zeros, "f2": zeros, "y": pa.array(np.zeros(rows, np.int8))})


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*args, **kwargs):
        raise AssertionError("the data was decoded before its size was checked")

    monkeypatch.setattr(pq.ParquetFile, "read", read)


def test_parquet_with_more_cells_than_the_limit_allows_is_refused_unread(no_decoding: None) -> None:
    data = to_parquet(_zeros(2_000_000), compression="zstd")  # 8M cells, 64 MB decoded
    assert len(data) < MAX // 10
    exc = rejected(data, "a.parquet")
    assert exc.reason == "too_large" and exc.detail == f"parquet: 2000000 rows x 4 columns exceeds the limit of {MAX // 2} cells"


def test_parquet_inflating_past_max_bytes_is_refused_unread(no_decoding: None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_parquet(_zeros(100_000), compression="zstd", use_dictionary=False)  # 400k cells, 2.5 MB plain
    assert len(data) < MAX // 10
    exc = rejected(data, "a.parquet")
    assert exc.reason == "too_large" and exc.detail == f"parquet: uncompressed size exceeds the limit of {MAX} bytes"
    monkeypatch.undo()  # decode again
    wide_shards = SPEC.model_copy(update={"shard_rows": 4096})  # 4-row shards would be too many for 100k rows
    assert preprocess_file(data, "a.parquet", wide_shards, 4 * MAX).rows == 100_000  # the same file under a larger limit


def test_parquet_text_column_is_refused_before_its_cells_are_decoded(no_decoding: None) -> None:
    big = "x" * 100_000
    table = pa.table({"f0": [big] * 1000, "f1": [1.0] * 1000, "f2": [1.0] * 1000, "y": [0] * 1000})
    exc = rejected(to_parquet(table), "a.parquet")
    assert exc.reason == "non_numeric" and exc.detail == "column 'f0' has type string, not a number"


@pytest.mark.parametrize("name", ["a.csv", "a.parquet"])
def test_row_cap(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import shared.preprocess

    table = make_table(10)
    data = to_csv(table) if name.endswith(".csv") else to_parquet(table)
    monkeypatch.setattr(shared.preprocess, "MAX_ROWS", 9)
    exc = rejected(data, name)
    assert exc.reason == "too_large" and "10 rows exceeds the limit of 9" in exc.detail
    monkeypatch.setattr(shared.preprocess, "MAX_ROWS", 10)
    assert preprocess_file(data, name, SPEC, MAX).rows == 10


def test_a_file_that_would_make_more_shards_than_its_data_sets_record_holds_is_refused() -> None:
    assert SPEC.max_shards_per_file == 1333  # one expected file: every shard URI of the record is its
    rows = 1333 * 4
    assert preprocess_file(to_csv(make_table(rows)), "a.csv", SPEC, MAX).rows == rows
    exc = rejected(to_csv(make_table(rows + 1)), "a.csv")
    assert (exc.reason, exc.detail) == (
        "too_many_shards", f"{rows + 1} rows make 1334 shards of 4 rows; a file of this data set may make 1333 (raise shard_rows, or split the data set)",
    )
