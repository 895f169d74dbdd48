"""Turn one uploaded data file into training shards plus its sufficient statistics.

Pure logic (bytes in, bytes out) so the raw-upload Cloud Function stays thin and this
can be tested without a cloud. Imports only pyarrow and numpy: it runs on cold starts.

Every bad input becomes `RejectedFile` (quarantined, never retried), so a parser
exception can never turn into an endless retry loop. Row numbers in messages count
data rows from 1 (the CSV header is not a row).

A refusal's detail goes to the hub's quarantine records and to logs, so it never holds
a cell's value: only column names, row numbers and the kind of problem. pyarrow's own
messages echo cells and whole rows, so they are never passed on.

Sizes are bounded before anything is decoded: a Parquet file's footer must promise at
most `max_bytes` of uncompressed data, `MAX_ROWS` rows and `max_bytes // 2` cells (no
more than a CSV within the limit could hold), and the columns read must be numeric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from shared.datasets import DatasetSpec, FeatureStats

_CSV_NULLS = [""]  # only empty cells are missing; "NA"/"NaN" text is judged as a value
MAX_ROWS = 10_000_000  # rows of one file, CSV or Parquet
_RAGGED = re.compile(r"CSV parse error: (?:Row #(\d{1,12}): )?Expected (\d{1,12}) columns, got (\d{1,12}):")


class RejectedFile(Exception):
    """The file cannot be used; it goes to quarantine with this reason. Never retried."""

    def __init__(self, reason: str, detail: str, problems: list[str] | None = None) -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())[:300]  # one line, bounded: it lands in logs/metadata
        self.problems = problems or []  # each refused part on its own (e.g. every bad name of a declaration)
        super().__init__(f"{reason}: {self.detail}")


@dataclass(frozen=True)
class ProcessedFile:
    shards: list[bytes]
    rows: int
    stats: FeatureStats


def preprocess_file(data: bytes, file_name: str, spec: DatasetSpec, max_bytes: int) -> ProcessedFile:
    """Validate one CSV/Parquet file and cut it into deterministic Parquet shards."""
    if len(data) > max_bytes:
        raise RejectedFile("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise RejectedFile("empty", f"{file_name} has zero bytes")
    name = file_name.lower()
    if name.endswith(".csv"):
        table = _read_csv(data, spec)
    elif name.endswith(".csv.gz"):
        table = _read_csv(_gunzip(data, max_bytes), spec)
    elif name.endswith((".parquet", ".pq")):
        table = _read_parquet(data, spec, max_bytes)
    else:
        raise RejectedFile("unsupported_format", f"{file_name}: use .csv, .csv.gz, .parquet or .pq")
    if table.num_rows == 0:
        raise RejectedFile("no_rows", f"{file_name} has no data rows")
    if table.num_rows > MAX_ROWS:
        raise RejectedFile("too_large", f"{table.num_rows} rows exceeds the limit of {MAX_ROWS}")
    if (shards := -(-table.num_rows // spec.shard_rows)) > spec.max_shards_per_file:
        raise RejectedFile(
            "too_many_shards",
            f"{table.num_rows} rows make {shards} shards of {spec.shard_rows} rows; a file of this data set may make "
            f"{spec.max_shards_per_file} (raise shard_rows, or split the data set)",
        )
    for column_name in [*spec.features, spec.label]:
        _check_no_nulls(table.column(column_name), column_name)
    columns = [_feature_values(table.column(f), f) for f in spec.features]
    labels = _label_values(table.column(spec.label), spec)
    means = [float(c.mean(dtype=np.float64)) for c in columns]
    stats = FeatureStats(
        count=table.num_rows,
        mean=means,
        # Two passes (mean, then squared deviations from it): no cancellation when the
        # mean is large next to the spread. Values are float64 and finite in float32.
        m2=[float(np.square(c - m, dtype=np.float64).sum()) for c, m in zip(columns, means)],
        label_counts=np.bincount(labels, minlength=spec.num_classes).tolist(),
    )
    out = pa.table(
        [pa.array(c.astype(np.float32)) for c in columns] + [pa.array(labels)],
        names=[*spec.features, spec.label],
    )
    shards = [_write_parquet(out.slice(i, spec.shard_rows)) for i in range(0, out.num_rows, spec.shard_rows)]
    return ProcessedFile(shards=shards, rows=out.num_rows, stats=stats)


def read_shard(data: bytes, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """A shard as (x float32 [n, f] in spec.features order, y int32 [n]) for the worker."""
    table = pq.read_table(pa.BufferReader(data), columns=[*spec.features, spec.label])
    x = np.empty((table.num_rows, len(spec.features)), dtype=np.float32)
    for j, name in enumerate(spec.features):
        x[:, j] = table.column(name).to_numpy()
    y = table.column(spec.label).to_numpy().astype(np.int32, copy=False)
    return x, y


def _write_parquet(table: pa.Table) -> bytes:
    """Fixed writer options, so a retried upload rewrites byte-identical objects."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False, row_group_size=table.num_rows or 1)
    return sink.getvalue().to_pybytes()


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress, applying max_bytes to the inflated size too (a small .gz can be a bomb)."""
    try:
        raw = pa.input_stream(pa.BufferReader(data), compression="gzip").read(max_bytes + 1)
    except Exception as exc:  # noqa: BLE001 - any codec failure means a bad upload
        _reraise_memory(exc)
        raise RejectedFile("unparseable", f"gzip: not a readable gzip stream ({_kind(exc)})") from None
    if len(raw) > max_bytes:
        raise RejectedFile("too_large", f"decompressed size exceeds the limit of {max_bytes} bytes")
    if not raw:
        raise RejectedFile("empty", "decompressed file has zero bytes")
    return raw


def _read_csv(data: bytes, spec: DatasetSpec) -> pa.Table:
    """Fast path: parse only the used columns straight to float64; diagnose on failure."""
    used = [*spec.features, spec.label]
    if b"\n" not in data and b"\r" not in data:
        data += b"\n"  # pyarrow calls a lone header without a newline "empty"; it is a header
    try:
        return pcsv.read_csv(
            pa.BufferReader(data),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.float64() for c in used}, include_columns=used, null_values=_CSV_NULLS
            ),
        )
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, KeyError, UnicodeError...
        _reraise_memory(exc)
        _diagnose_csv(data, used)
        raise RejectedFile("unparseable", f"csv: the file could not be parsed ({_kind(exc)})") from None


def _diagnose_csv(data: bytes, used: list[str]) -> None:
    """Slow path for a failed CSV: re-read used columns as text to name what is wrong.

    Checks in the same order as the fast path (rows, columns, then nulls, then numbers)
    so a file gets the same reason whichever path saw it. Returns if nothing specific is
    found; the caller then reports the kind of pyarrow's error (never its message,
    which quotes the row).
    """
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(use_threads=False),  # so a parse error names its row
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in used}, null_values=_CSV_NULLS, strings_can_be_null=True
            ),
        )
        names = table.column_names  # decoding a non-UTF-8 header raises here
        columns = {n: table.column(names.index(n)) for n in used if n in names}  # first wins, as in read_csv
    except Exception as exc:  # noqa: BLE001
        _reraise_memory(exc)
        # Only the numbers before the row's text: "CSV parse error: Row #3: Expected 4 columns, got 2: <row>"
        if isinstance(exc, pa.ArrowInvalid) and (m := _RAGGED.match(str(exc))):
            where = f"row {int(m[1]) - 1}" if m[1] else "a row"  # pyarrow counts the header as row 1
            raise RejectedFile("unparseable", f"csv: {where} has {m[3]} cells; the header has {m[2]}") from None
        raise RejectedFile("unparseable", f"csv: the file could not be parsed ({_kind(exc)})") from None
    _check_columns(names, used)
    for name in used:
        _check_no_nulls(columns[name], name)
    for name in used:
        column = columns[name]
        if pa.types.is_string(column.type) and (row := _first_unparsable(column)) is not None:
            raise RejectedFile("non_numeric", f"column {name!r} row {row}: not a number")


def _first_unparsable(column: pa.ChunkedArray) -> int | None:
    """1-based row of the first value that does not cast to float64 (bisection over prefixes)."""
    values = pc.utf8_trim_whitespace(column.combine_chunks())

    def casts(n: int) -> bool:
        try:
            pc.cast(values.slice(0, n), pa.float64())
            return True
        except pa.ArrowInvalid:
            return False

    if casts(len(values)):
        return None
    lo, hi = 0, len(values)  # casts(lo) is True, casts(hi) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if casts(mid) else (lo, mid)
    return hi


def _read_parquet(data: bytes, spec: DatasetSpec, max_bytes: int) -> pa.Table:
    used = [*spec.features, spec.label]
    try:
        file = pq.ParquetFile(pa.BufferReader(data))
        schema = file.schema_arrow
        _check_columns(schema.names, used)
        if len(set(schema.names)) != len(schema.names):
            raise RejectedFile("unparseable", "parquet: duplicate column names")
        for name in used:  # before decoding: a text column's cells can be any size
            _check_numeric_type(schema.field(name).type, name)
        _check_parquet_size(file.metadata, len(used), max_bytes)
        return file.read(columns=used)
    except RejectedFile:
        raise
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError (thrift), NotImplemented...
        _reraise_memory(exc)
        raise RejectedFile("unparseable", f"parquet: the file could not be read ({_kind(exc)})") from None


def _check_parquet_size(meta: pq.FileMetaData, columns: int, max_bytes: int) -> None:
    """What the footer promises, bounded before any page is decoded (a small file can inflate to gigabytes)."""
    rows = meta.num_rows
    if rows < 0:
        raise RejectedFile("unparseable", "parquet: the footer claims a negative row count")
    if rows > MAX_ROWS:
        raise RejectedFile("too_large", f"parquet: {rows} rows exceeds the limit of {MAX_ROWS}")
    if rows * columns > max_bytes // 2:
        raise RejectedFile("too_large", f"parquet: {rows} rows x {columns} columns exceeds the limit of {max_bytes // 2} cells")
    if sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) != rows:
        raise RejectedFile("unparseable", "parquet: the row groups' row counts do not add up to the file's")
    inflated = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        inflated += max(group.total_byte_size, sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)))
        if inflated > max_bytes:
            raise RejectedFile("too_large", f"parquet: uncompressed size exceeds the limit of {max_bytes} bytes")


def _check_columns(present: list[str], used: list[str]) -> None:
    missing = [c for c in used if c not in set(present)]
    if missing:
        raise RejectedFile("missing_columns", f"missing {', '.join(map(repr, missing))}")


def _check_no_nulls(column: pa.ChunkedArray, name: str) -> None:
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False))) + 1
        raise RejectedFile("null_values", f"column {name!r} has {column.null_count} empty cells, first at row {row}")


def _check_numeric_type(t: pa.DataType, name: str) -> None:
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        shown = t if pa.types.is_primitive(t) or pa.types.is_string(t) or pa.types.is_binary(t) else "a nested type"
        raise RejectedFile("non_numeric", f"column {name!r} has type {shown}, not a number")


def _numeric(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """One conversion to a float64 numpy array; only integer/float/decimal columns qualify."""
    _check_numeric_type(column.type, name)
    try:
        return column.cast(pa.float64()).to_numpy()
    except pa.ArrowException as exc:
        raise RejectedFile("non_numeric", f"column {name!r}: not convertible to a number ({_kind(exc)})") from None


def _feature_values(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """Finite in float32 too: the shard stores float32, so 1e300 would become inf."""
    values = _numeric(column, name)
    bad = ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max)
    if bad.any():
        row = int(np.argmax(bad))
        value = values[row]
        kind = "NaN" if np.isnan(value) else "infinite" if np.isinf(value) else "beyond the float32 range"
        raise RejectedFile("non_numeric", f"column {name!r} row {row + 1}: not a finite float32 ({kind})")
    return values


def _label_values(column: pa.ChunkedArray, spec: DatasetSpec) -> np.ndarray:
    values = _numeric(column, spec.label)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values >= spec.num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        value = float(values[row])
        if not np.isfinite(value):
            kind = "not finite"
        elif value != np.floor(value):
            kind = "not a whole number"
        else:
            kind = "negative" if value < 0 else "too large"
        raise RejectedFile(
            "bad_label", f"column {spec.label!r} row {row + 1}: not an integer in [0, {spec.num_classes}) ({kind})"
        )
    return values.astype(np.int32)


def _kind(exc: Exception) -> str:
    """An exception's class only: pyarrow's and codecs' messages quote cells, rows and bytes."""
    return type(exc).__name__


def _reraise_memory(exc: Exception) -> None:
    """Running out of memory is our problem, not the file's: let the platform retry."""
    if isinstance(exc, MemoryError):  # pyarrow.ArrowMemoryError is one too
        raise exc
