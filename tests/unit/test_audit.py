"""The audit trail: Cloud Logging's JSON line, the typed record, and `fedpipe audit`."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from rich.console import Console
from typer.testing import CliRunner

from fedpipe import audit as audit_cli
from shared.audit import AUDIT_COLLECTION, AuditEvent, Auditor, AuditRecord, FirestoreAuditStore

pytestmark = pytest.mark.unit

AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


class ListStore:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[AuditRecord] = []
        self.fail = fail

    def add(self, record: AuditRecord) -> None:
        if self.fail:
            raise RuntimeError("firestore unavailable")
        self.records.append(record)


def test_one_event_is_one_cloud_logging_line_and_one_record():
    stream, store = io.StringIO(), ListStore()
    record = Auditor(store, stream)(AuditEvent.KEY_REFUSED, now=AT, node="us", operation="decrypt", reason="debug_image",
                                    image_digest="sha256:" + "1" * 64, hwmodel="GCP_INTEL_TDX")
    entry = json.loads(stream.getvalue())
    assert stream.getvalue().count("\n") == 1
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "key_refused decrypt node=us reason=debug_image"
    assert entry["timestamp"] == "2025-03-04T05:06:07+00:00"
    assert entry["logging.googleapis.com/labels"] == {"fedpipe_audit": "key_refused", "source": "key-broker", "node": "us"}
    assert entry["audit"]["reason"] == "debug_image" and entry["audit"]["hwmodel"] == "GCP_INTEL_TDX"
    assert store.records == [record]


@pytest.mark.parametrize("secret", ["token", "attestation_token", "plaintext", "key", "nonce"])
def test_a_secret_has_no_field_to_go_in(secret):
    stream = io.StringIO()
    with pytest.raises(ValidationError):
        Auditor(ListStore(), stream)(AuditEvent.KEY_RELEASED, node="us", **{secret: "s3cret"})
    assert stream.getvalue() == ""  # not logged either


def test_a_store_failure_keeps_the_log_line_and_does_not_raise():
    stream = io.StringIO()
    Auditor(ListStore(fail=True), stream)(AuditEvent.ATTESTATION_FAILED, now=AT, node="eu", reason="expired")
    assert json.loads(stream.getvalue())["severity"] == "ERROR"


def test_the_firestore_store_adds_the_typed_record_without_empty_fields():
    added = []

    class Collection:
        def add(self, doc):
            added.append(doc)

    class Db:
        def collection(self, name):
            assert name == AUDIT_COLLECTION
            return Collection()

    record = AuditRecord(event=AuditEvent.KEY_RELEASED, at=AT, node="us", operation="encrypt", key_id=7)
    FirestoreAuditStore(Db()).add(record)
    assert added == [{"event": AuditEvent.KEY_RELEASED, "at": AT, "node": "us", "operation": "encrypt", "key_id": 7, "source": "key-broker"}]
    assert AuditRecord.model_validate(added[0]) == record


class FakeStore:
    def __init__(self, records: list[AuditRecord]) -> None:
        self.records, self.asked = records, []

    def recent(self, node=None, limit=50):
        self.asked.append((node, limit))
        return [r for r in self.records if node in (None, r.node)][:limit]


@pytest.fixture
def records(monkeypatch):
    store = FakeStore([
        AuditRecord(event=AuditEvent.KEY_REFUSED, at=AT, node="eu", operation="decrypt", reason="wrong_image", image_digest="sha256:" + "2" * 64),
        AuditRecord(event=AuditEvent.KEY_RELEASED, at=AT, node="us", operation="encrypt", key_id=42),
    ])
    monkeypatch.setattr(audit_cli, "_store", lambda: store)
    return store


def test_fedpipe_audit_json_lists_the_records(records):
    result = CliRunner().invoke(audit_cli.audit_app, ["--node", "eu", "--limit", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert records.asked == [("eu", 5)]
    assert [(r["node"], r["reason"]) for r in json.loads(result.output)] == [("eu", "wrong_image")]


def test_fedpipe_audit_table_shows_reasons_and_key_ids(records, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(audit_cli, "console", Console(file=out, width=200))
    result = CliRunner().invoke(audit_cli.audit_app, [])
    assert result.exit_code == 0, result.output
    assert records.asked == [(None, 50)]
    rows = [line for line in out.getvalue().splitlines() if "2025-03-04" in line]
    assert len(rows) == 2
    assert "key_refused" in rows[0] and "wrong_image" in rows[0] and "sha256:222222222222…" in rows[0]
    assert "key_released" in rows[1] and "42" in rows[1]


class SlowStore:
    """A store that fails on one record and holds the writer until released."""

    def __init__(self) -> None:
        import threading

        self.records: list[AuditRecord] = []
        self.release = threading.Event()

    def add(self, record: AuditRecord) -> None:
        self.release.wait(5)
        if record.node == "broken":
            raise RuntimeError("firestore blinked")
        self.records.append(record)


def test_the_background_sink_stores_in_order_off_the_callers_path_and_survives_a_failure(caplog):
    import time

    from shared.audit import BackgroundSink

    store = SlowStore()
    audit = Auditor(BackgroundSink(store), stream=io.StringIO())
    started = time.monotonic()
    for node in ("us", "broken", "eu"):
        audit(AuditEvent.KEY_RELEASED, node=node, operation="decrypt")
    assert time.monotonic() - started < 1 and store.records == []  # the caller did not wait for the store
    store.release.set()
    deadline = time.monotonic() + 5
    while len(store.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.node for r in store.records] == ["us", "eu"]
    assert "audit record key_released not stored" in caplog.text


def test_a_full_background_sink_keeps_the_log_line_and_says_the_record_was_not_stored(caplog):
    from shared.audit import BackgroundSink

    store = SlowStore()  # never released within the test: the writer holds one record, the queue one more
    stream = io.StringIO()
    audit = Auditor(BackgroundSink(store, max_pending=1), stream=stream)
    for _ in range(4):
        audit(AuditEvent.KEY_REFUSED, node="us", operation="decrypt", reason="wrong_image")
    assert len(stream.getvalue().splitlines()) == 4  # every event is in the log
    assert "not stored: 1 records already wait for the store" in caplog.text
    store.release.set()
