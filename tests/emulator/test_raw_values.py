"""Raw values never leave their node (issue 8, part 5).

Bad rows of CSV and Parquet uploads carry a marker string. Once every file is
quarantined, the marker must appear in no Firestore document (every collection and
subcollection, base64 bodies decoded), in no log of the local cloud, and in no output
of the CLI; the quarantine reasons name row, column and the kind of error instead.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.datasets import SPEC_OBJECT
from shared.quarantine import QuarantineStore
from tests.conftest import wait_for
from tests.emulator.helpers import delivered

pytestmark = pytest.mark.emulator

MARKER = "MARKER-7f3a-SECRET"
DATASET = "leak"
FEDPIPE = str(Path(sys.executable).parent / "fedpipe")


def csv_rows(bad_row: int, bad: str) -> bytes:
    """Five rows with the marker in an unused column of each; row `bad_row` replaced by `bad`."""
    lines = ["f0,f1,y,note", *(bad if i == bad_row else f"{i},{i * 2},{i % 3},{MARKER}" for i in range(1, 6))]
    return ("\n".join(lines) + "\n").encode()


def parquet(columns: dict[str, list]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


# file name -> (bytes, the quarantine reason and detail expected, by value)
BAD_FILES = {
    "non-numeric.csv": (csv_rows(3, f"1,{MARKER},0,{MARKER}"), "non_numeric", "column 'f1' row 3: not a number"),
    "label-out-of-range.csv": (csv_rows(2, f"1,2,7,{MARKER}"), "bad_label", "column 'y' row 2: not an integer in [0, 3) (too large)"),
    "too-many-fields.csv": (csv_rows(4, f"1,2,0,{MARKER},{MARKER}"), "unparseable", "csv: row 4 has 5 cells; the header has 4"),
    "text-label.csv": (csv_rows(1, f"1,2,{MARKER},x"), "non_numeric", "column 'y' row 1: not a number"),
    "open-quote.csv": (csv_rows(2, f'1,"{MARKER},0,x'), "unparseable", "csv: row 2 has 2 cells; the header has 4"),
    "not-utf8.csv": (
        csv_rows(2, "1,@,0,x").replace(b"@", b"\xff" + MARKER.encode()), "unparseable", "csv: the file could not be parsed (ArrowInvalid)",
    ),
    "non-numeric.csv.gz": (gzip.compress(csv_rows(3, f"1,{MARKER},0,{MARKER}"), mtime=0), "non_numeric", "column 'f1' row 3: not a number"),
    "text-column.parquet": (parquet({"f0": [1.0, 2.0], "f1": ["1", MARKER], "y": [0, 1]}), "non_numeric", "column 'f1' has type string, not a number"),
    "label-out-of-range.parquet": (
        parquet({"f0": [1.0, 2.0], "f1": [1.0, 2.0], "y": [0, 9], "note": [MARKER, MARKER]}),
        "bad_label", "column 'y' row 2: not an integer in [0, 3) (too large)",
    ),
    "nan.parquet": (
        parquet({"f0": [1.0, float("nan")], "f1": [1.0, 2.0], "y": [0, 1], "note": [MARKER, MARKER]}),
        "non_numeric", "column 'f0' row 2: not a finite float32 (NaN)",
    ),
}


def mentions(value: object, needle: bytes) -> bool:
    """Whether `value` holds `needle`: in any string or bytes, in JSON they hold, or base64-encoded in them."""
    if isinstance(value, dict):
        return any(mentions(k, needle) or mentions(v, needle) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(mentions(v, needle) for v in value)
    if isinstance(value, str):
        value = value.encode(errors="surrogatepass")
    if not isinstance(value, bytes) or len(value) < len(needle) // 2:
        return False
    if needle in value:
        return True
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, (dict, list)) and mentions(parsed, needle):
        return True
    return any(mentions(decoded, needle) for decoded in _base64_parts(value))


def _base64_parts(text: bytes) -> list[bytes]:
    """Every run of base64 characters long enough to hide the needle, decoded (standard and URL-safe)."""
    decoded = []
    for run in re.findall(rb"[A-Za-z0-9+/_-]{16,}={0,2}", text):
        padded = run + b"=" * (-len(run) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded.append(decode(padded))
            except (binascii.Error, ValueError):
                pass
    return decoded


def every_document(db) -> list[tuple[str, dict]]:
    """(path, fields) of every document in the database, subcollections of missing parents included."""
    found, collections = [], list(db.collections())
    while collections:
        refs = list(collections.pop().list_documents())
        for ref in refs:
            collections.extend(ref.collections())
        found += [(snap.reference.path, snap.to_dict()) for snap in db.get_all(refs) if snap.exists]
    return found


def fedpipe(*args: str) -> str:
    run = subprocess.run(
        [FEDPIPE, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "10000"},  # wide: no cell wraps
    )
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def test_no_raw_value_leaves_its_node(cloud, clients):
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    spec = {"features": ["f0", "f1"], "label": "y", "num_classes": 3, "expected_files": list(BAD_FILES), "train_on_complete": False}
    bucket.blob(f"{DATASET}/{SPEC_OBJECT}").upload_from_string(json.dumps(spec))
    for name, (data, _, _) in BAD_FILES.items():
        bucket.blob(f"{DATASET}/{name}").upload_from_string(data)

    store = QuarantineStore(clients.db, clients.settings)
    records = wait_for(lambda: len(r := store.recent(dataset=DATASET)) == len(BAD_FILES) and r, 90, "every bad file quarantined")
    by_file = {r.source.rsplit("/", 1)[1]: r for r in records}
    assert {name: (r.reason, r.detail) for name, r in by_file.items()} == {name: (reason, detail) for name, (_, reason, detail) in BAD_FILES.items()}
    assert all(r.kept_at and r.kept_at.startswith(f"gs://{clients.settings.quarantine_bucket('us')}/") for r in records)  # kept at home
    # Every upload delivered once, so each function has logged what it did before the logs are read.
    uploads = delivered(clients, lambda r: r["trigger"] == "raw-upload-us" and f"objects/{DATASET}/" in r["subject"], len(BAD_FILES) + 1)
    assert {(r["status"], r["attempts"]) for r in uploads} == {("delivered", 1)}

    needle = MARKER.encode()
    documents = every_document(clients.db)
    assert any(path.startswith(f"{clients.settings.quarantine_collection}/") for path, _ in documents)  # the walk saw the records
    assert [path for path, fields in documents if mentions(fields, needle)] == []

    logs = sorted((Path(cloud.endpoints.state_dir) / "logs").glob("**/*.log"))
    assert any(b"quarantined" in log.read_bytes() for log in logs)
    assert [log.name for log in logs if mentions(log.read_bytes(), needle)] == []

    shown = fedpipe("quarantine", "--limit", "1000")
    assert all(f"{DATASET}/{name}" in shown for name in BAD_FILES)  # the command shows the records...
    outputs = {"quarantine": shown, "jobs list": fedpipe("jobs", "list", "--limit", "1000", "--json"),
               "events tail": fedpipe("events", "tail", "--limit", "1000")}
    assert [command for command, out in outputs.items() if mentions(out, needle)] == []  # ...and no cell of them
