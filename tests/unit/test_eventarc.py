"""emulators.eventarc: emulator output -> production's binary-mode CloudEvents, decoded with the real types."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import requests
from cloudevents.http import from_http
from google.events.cloud.firestore_v1 import ArrayValue, Document, DocumentEventData, MapValue, Value

from emulators.deliveries import RecordWriter, coalesce, delivery_doc
from emulators.eventarc import (
    STORAGE_EVENT_TYPES,
    OutgoingEvent,
    firestore_event,
    header_value,
    pubsub_event,
    rfc3339,
    storage_event,
    wire_headers,
)
from emulators.router import Router
from emulators.router_config import RetryPolicy, RouterConfig
from shared.config import Settings
from shared.events import document_change, pubsub_message, storage_object
from shared.ingest import RawObject
from shared.triggers import FIRESTORE_WRITTEN, PUBSUB_PUBLISHED, STORAGE_FINALIZED

pytestmark = pytest.mark.unit

EVENTS = Path(__file__).parent.parent / "data" / "events"
PUBLISHED = datetime(2024, 5, 1, 10, 0, 5, 250000, tzinfo=UTC)


def golden(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture
def gcs_object() -> dict:
    return golden("gcs_object_finalize.json")


@pytest.fixture
def gcs_attributes() -> dict:
    return golden("gcs_notification_attributes.json")


# -- storage ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ce_type"),
    [
        ("OBJECT_FINALIZE", "google.cloud.storage.object.v1.finalized"),
        ("OBJECT_DELETE", "google.cloud.storage.object.v1.deleted"),
        ("OBJECT_METADATA_UPDATE", "google.cloud.storage.object.v1.metadataUpdated"),
    ],
)
def test_storage_event_type_mapping(gcs_object, gcs_attributes, kind, ce_type):
    event = storage_event(json.dumps(gcs_object).encode(), {**gcs_attributes, "eventType": kind}, "m-1", PUBLISHED)
    assert event is not None
    assert event.type == ce_type
    assert event.headers["ce-type"] == ce_type


def test_finalize_is_the_trigger_type():
    assert STORAGE_EVENT_TYPES["OBJECT_FINALIZE"] == STORAGE_FINALIZED


@pytest.mark.parametrize("kind", ["OBJECT_SOMETHING", "", "object_finalize"])
def test_storage_event_unknown_type_is_none(gcs_object, gcs_attributes, kind):
    assert storage_event(json.dumps(gcs_object).encode(), {**gcs_attributes, "eventType": kind}, "m-1", PUBLISHED) is None


def test_storage_event_without_event_type_is_none(gcs_object, gcs_attributes):
    attrs = {k: v for k, v in gcs_attributes.items() if k != "eventType"}
    assert storage_event(json.dumps(gcs_object).encode(), attrs, "m-1", PUBLISHED) is None


def test_storage_event_headers(gcs_object, gcs_attributes):
    event = storage_event(json.dumps(gcs_object).encode(), gcs_attributes, "4242", PUBLISHED)
    assert event.headers == {
        "ce-specversion": "1.0",
        "ce-id": "4242",
        "ce-source": "//storage.googleapis.com/projects/_/buckets/fedpipe-local-us-raw",
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-subject": "objects/iris/part-0.csv",
        "ce-time": "2024-05-01T10:00:00.123456Z",
        "ce-bucket": "fedpipe-local-us-raw",
        "content-type": "application/json",
    }
    assert event.id == "4242"
    assert event.subject == "objects/iris/part-0.csv"
    assert json.loads(event.body) == gcs_object


def test_storage_event_falls_back_to_the_object_for_bucket_and_name(gcs_object):
    event = storage_event(json.dumps(gcs_object).encode(), {"eventType": "OBJECT_FINALIZE"}, "1", PUBLISHED)
    assert event.headers["ce-bucket"] == gcs_object["bucket"]
    assert event.headers["ce-source"] == f"//storage.googleapis.com/projects/_/buckets/{gcs_object['bucket']}"
    assert event.subject == f"objects/{gcs_object['name']}"


def test_storage_event_time_falls_back_to_publish_time(gcs_object, gcs_attributes):
    obj = {k: v for k, v in gcs_object.items() if k != "updated"}
    event = storage_event(json.dumps(obj).encode(), gcs_attributes, "1", PUBLISHED)
    assert event.headers["ce-time"] == "2024-05-01T10:00:05.250000Z"


def test_storage_event_decodes_with_the_real_type(gcs_object, gcs_attributes):
    event = storage_event(json.dumps(gcs_object).encode(), gcs_attributes, "1", PUBLISHED)
    obj = storage_object(event.body)
    assert obj == RawObject(bucket="fedpipe-local-us-raw", name="iris/part-0.csv", generation=1714557600123456, size=2048)
    assert isinstance(obj.generation, int) and isinstance(obj.size, int)
    # The same object given as a dict (functions-framework hands over parsed JSON) decodes the same.
    assert storage_object(json.loads(event.body)) == obj


def test_storage_event_carries_the_objects_custom_metadata(gcs_object, gcs_attributes):
    """The hub reads an update's example count and metrics from the event, not from a second request."""
    with_meta = {**gcs_object, "metadata": {"examples": "120", "metrics": '{"global_loss": 0.5}'}}
    obj = storage_object(storage_event(json.dumps(with_meta).encode(), gcs_attributes, "1", PUBLISHED).body)
    assert obj.metadata == {"examples": "120", "metrics": '{"global_loss": 0.5}'}


# -- pubsub -------------------------------------------------------------------


def test_pubsub_event_body_and_headers():
    event = pubsub_event("p", "t", "s", b"\x00hello\xff", {"k": "v"}, "77", PUBLISHED)
    body = json.loads(event.body)
    msg = body["message"]
    assert base64.b64decode(msg["data"]) == b"\x00hello\xff"
    assert msg["attributes"] == {"k": "v"}
    assert msg["messageId"] == msg["message_id"] == "77"
    assert msg["publishTime"] == msg["publish_time"] == "2024-05-01T10:00:05.250000Z"
    assert body["subscription"] == "projects/p/subscriptions/s"
    assert event.headers == {
        "ce-specversion": "1.0",
        "ce-id": "77",
        "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
        "ce-type": PUBSUB_PUBLISHED,
        "ce-time": "2024-05-01T10:00:05.250000Z",
        "content-type": "application/json",
    }


def test_pubsub_event_decodes_with_the_real_type():
    payload = json.dumps({"node": "us", "dataset": "iris"}).encode()
    event = pubsub_event("p", "shard-ready", "s", payload, {"node": "us"}, "77", PUBLISHED)
    message = pubsub_message(event.body)
    assert message.data == payload
    assert message.attributes == {"node": "us"}
    assert message.message_id == "77"
    assert pubsub_message(json.loads(event.body)) == message


def test_rfc3339_converts_to_utc():
    local = datetime(2024, 5, 1, 12, 0, 5, 250000, tzinfo=timezone(timedelta(hours=2)))
    assert rfc3339(local) == "2024-05-01T10:00:05.250000Z"


# -- firestore ----------------------------------------------------------------

STAMP = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)


def job_written_pb() -> bytes:
    doc = Document(
        name="projects/p/databases/(default)/documents/jobs/a1",
        fields={
            "status": Value(string_value="pending"),
            "attempt": Value(integer_value=2),
            "spec": Value(
                map_value=MapValue(
                    fields={
                        "dataset": Value(map_value=MapValue(fields={"node": Value(string_value="us")})),
                        "learning_rate": Value(double_value=0.5),
                    }
                )
            ),
            "hidden": Value(array_value=ArrayValue(values=[Value(integer_value=64), Value(string_value="x")])),
            "error": Value(null_value=0),
            "created_at": Value(timestamp_value=STAMP),
        },
    )
    return DocumentEventData.serialize(DocumentEventData(value=doc))


def test_firestore_event_mends_the_emulator_event():
    headers = golden("firestore_emulator_headers.json")
    body = base64.b64encode(job_written_pb())
    event = firestore_event("fedpipe-local", headers, body, "us-central1")
    h = event.headers
    assert h["ce-source"] == "//firestore.googleapis.com/projects/fedpipe-local/databases/(default)"
    assert "projects/projects" not in h["ce-source"]
    assert "ce-datacontenttype" not in h
    assert not any(k.lower() == "ce-datacontenttype" for k in h)
    assert h["content-type"] == "application/protobuf"
    assert h["ce-specversion"] == "1.0"
    assert h["ce-id"] == "6a0c7b3e-2f4f-4d55-9d2e-0b1c2d3e4f50"
    assert h["ce-type"] == FIRESTORE_WRITTEN
    assert h["ce-subject"] == "documents/jobs/a1"
    assert h["ce-document"] == "jobs/a1"
    assert h["ce-project"] == "fedpipe-local"
    assert h["ce-database"] == "(default)"
    assert h["ce-namespace"] == "(default)"
    assert h["ce-location"] == "us-central1"
    assert "host" not in {k.lower() for k in h}  # only CloudEvents headers travel
    assert all(k == k.lower() for k in h)
    assert event.body == job_written_pb()


def test_firestore_event_passes_raw_bytes_through():
    raw = job_written_pb()
    event = firestore_event("p", {"ce-id": "1"}, raw, "us-central1")
    assert event.body == raw
    assert event.headers["ce-type"] == FIRESTORE_WRITTEN  # default when the emulator omits it


def test_firestore_event_then_document_change():
    headers = golden("firestore_emulator_headers.json")
    event = firestore_event("p", headers, base64.b64encode(job_written_pb()), "us-central1")
    change = document_change(event.body)
    assert change.path == "jobs/a1"
    assert change.id == "a1"
    assert change.before is None
    assert change.after == {
        "status": "pending",
        "attempt": 2,
        "spec": {"dataset": {"node": "us"}, "learning_rate": 0.5},
        "hidden": [64, "x"],
        "error": None,
        "created_at": STAMP,
    }
    assert type(change.after["attempt"]) is int
    assert change.after["created_at"] == STAMP


def test_document_change_of_a_deletion():
    doc = Document(name="projects/p/databases/(default)/documents/jobs/a1", fields={"status": Value(string_value="done")})
    raw = DocumentEventData.serialize(DocumentEventData(old_value=doc))
    change = document_change(firestore_event("p", {}, base64.b64encode(raw), "l").body)
    assert change.path == "jobs/a1"
    assert change.after is None
    assert change.before == {"status": "done"}


# -- OutgoingEvent ------------------------------------------------------------


def test_outgoing_event_json_round_trip():
    event = OutgoingEvent({"ce-id": "1", "ce-type": "t", "ce-subject": "s"}, b"\x00\x01binary\xff")
    doc = event.to_json()
    assert json.loads(json.dumps(doc)) == doc  # JSON-safe
    assert base64.b64decode(doc["body"]) == b"\x00\x01binary\xff"
    back = OutgoingEvent.from_json(doc)
    assert back == event
    assert (back.id, back.type, back.subject) == ("1", "t", "s")


def test_outgoing_event_without_subject():
    assert OutgoingEvent({"ce-id": "1", "ce-type": "t"}, b"").subject == ""


# -- header values on the wire (CloudEvents HTTP binding v1.0.2, 3.1.3.2) --------

LONG_NAME = "data/" + "長" * 338 + "_.csv"  # 1024 bytes of UTF-8, GCS's longest object name
NAMES = ["unicode_näme_数据.csv", "spaces in name.csv", 'quote"and%percent.csv', "tab\tnew\nline\x7f.csv", "emoji_🙂.csv", LONG_NAME]


def test_the_long_name_is_as_long_as_gcs_allows():
    assert len(LONG_NAME.encode()) == 1024


def test_header_value_keeps_printable_ascii():
    printable = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
    assert header_value(printable) == printable
    assert header_value("objects/iris/part-0.csv") == "objects/iris/part-0.csv"


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        (" ", "%20"),
        ('"', "%22"),
        ("%", "%25"),
        ("ä", "%C3%A4"),
        ("数据", "%E6%95%B0%E6%8D%AE"),
        ("\n\t\x7f", "%0A%09%7F"),
        ("🙂", "%F0%9F%99%82"),
    ],
)
def test_header_value_percent_encodes_the_utf8_bytes_the_binding_names(text, encoded):
    assert header_value(text) == encoded


@pytest.mark.parametrize("name", NAMES)
def test_header_value_is_ascii_and_decodes_back(name):
    value = header_value(f"objects/{name}")
    assert value.isascii() and value.isprintable() and " " not in value
    assert unquote(value, errors="strict") == f"objects/{name}"


def test_wire_headers_encode_only_the_attributes():
    headers = {"ce-subject": "objects/a b.csv", "ce-id": "1", "content-type": "application/json; charset=utf-8"}
    assert wire_headers(headers) == {"ce-subject": "objects/a%20b.csv", "ce-id": "1", "content-type": "application/json; charset=utf-8"}


@pytest.fixture
def receiver():
    """A local HTTP server that keeps the header values of each request it gets, as sent."""
    received: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            received.append(dict(self.headers))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", received
    server.shutdown()


@pytest.mark.parametrize("name", NAMES)
def test_a_storage_event_for_any_object_name_posts_and_decodes_back(gcs_object, gcs_attributes, receiver, name):
    url, received = receiver
    data = json.dumps({**gcs_object, "name": name}).encode()
    event = storage_event(data, {**gcs_attributes, "objectId": name}, "1", PUBLISHED)
    assert event.subject == f"objects/{name}"  # the record keeps the name as text

    requests.post(url, data=event.body, headers=wire_headers(event.headers), timeout=10).raise_for_status()

    assert unquote(received[0]["ce-subject"], errors="strict") == f"objects/{name}"
    assert storage_object(event.body).name == name


def test_functions_framework_hands_the_subject_over_percent_encoded(gcs_object, gcs_attributes):
    """cloudevents 1.12 (what functions-framework parses with) does not percent-decode header values.

    Our functions read the object name from the event data, never from the subject; this pins
    the library's behaviour so a change in it shows up here.
    """
    name = "unicode_näme_数据.csv"
    event = storage_event(json.dumps({**gcs_object, "name": name}).encode(), {**gcs_attributes, "objectId": name}, "1", PUBLISHED)
    received = from_http(wire_headers(event.headers), event.body)
    assert received["subject"] == "objects/unicode_n%C3%A4me_%E6%95%B0%E6%8D%AE.csv"
    assert unquote(received["subject"]) == f"objects/{name}"
    assert received.data["name"] == name


def test_firestore_event_reads_the_emulators_raw_utf8_document_id():
    """The emulator sends `jöb 数 %41` as raw UTF-8 bytes (http.server reads them as Latin-1), not percent-encoded."""
    as_read = {
        k: v.encode().decode("latin-1")
        for k, v in {"ce-id": "1", "ce-subject": "documents/jobs/jöb 数 %41", "ce-document": "jobs/jöb 数 %41"}.items()
    }
    event = firestore_event("p", as_read, job_written_pb(), "us-central1")
    assert event.subject == "documents/jobs/jöb 数 %41"
    assert event.headers["ce-document"] == "jobs/jöb 数 %41"
    assert wire_headers(event.headers)["ce-document"] == "jobs/j%C3%B6b%20%E6%95%B0%20%2541"


# -- delivery -----------------------------------------------------------------


class FakeRecords:
    """Stands in for the RecordWriter: keeps each record and runs its `then` at once."""

    def __init__(self) -> None:
        self.docs: list[dict] = []

    def put(self, key: str, doc: dict, then=lambda: None) -> None:
        self.docs.append(doc)
        then()


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict]] = []

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic: str, data: bytes, **attributes: str) -> Future:
        self.published.append((topic, data, attributes))
        done: Future = Future()
        done.set_result("1")
        return done


class RaisingSession:
    """A session whose POST fails with something that is not a requests.RequestException."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.posts = 0

    def post(self, *args, **kwargs):
        self.posts += 1
        raise self.exc


@pytest.fixture
def router(monkeypatch):
    """A Router wired to nothing: its clients point at closed ports, its records and dead letters are kept in memory."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9")
    settings = Settings(project="p")
    config = RouterConfig(
        function_urls={"on_raw_upload": "http://127.0.0.1:9/"}, retry=RetryPolicy(min_backoff_s=0, max_backoff_s=0, max_attempts=3)
    )
    router = Router(config, settings)
    router.records.close()
    router.records = FakeRecords()
    router.publisher = FakePublisher()
    return router


def upload_event(gcs_object, gcs_attributes) -> OutgoingEvent:
    return storage_event(json.dumps(gcs_object).encode(), gcs_attributes, "m-1", PUBLISHED)


@pytest.mark.parametrize(
    "exc", [UnicodeEncodeError("latin-1", "数", 0, 1, "ordinal not in range"), ValueError("bad header"), RuntimeError("?")]
)
def test_any_failure_to_post_is_a_failed_attempt_then_a_dead_letter(router, monkeypatch, gcs_object, gcs_attributes, exc):
    session = RaisingSession(exc)
    monkeypatch.setattr(router, "_session", lambda: session)
    acks = []
    trigger = router.triggers["raw-upload-us"]
    received = {"published_at": PUBLISHED, "received_at": PUBLISHED}

    router.deliver(trigger, upload_event(gcs_object, gcs_attributes), received, lambda: acks.append(1))  # does not raise

    assert session.posts == 3
    assert [(d["status"], d["attempts"]) for d in router.records.docs] == [("retrying", 1), ("retrying", 2), ("dead_lettered", 3)]
    assert type(exc).__name__ in router.records.docs[-1]["last_error"]
    assert router.records.docs[-1]["received_at"] == PUBLISHED and router.records.docs[-1]["answered_at"] is not None
    [(topic, data, attributes)] = router.publisher.published
    assert topic.endswith("/fedpipe-dead-letter") and attributes == {"trigger": "raw-upload-us"}
    assert json.loads(data)["event"]["headers"]["ce-id"] == "m-1"
    assert acks == [1]  # acked once, after the dead-lettered record


def test_a_message_whose_handling_raises_is_dead_lettered_and_acked_not_nacked(router):
    """The subscriber nacks a message whose callback raised, and the emulator redelivers it at once: a hot loop."""
    message = SimpleNamespace(data=b"\x00", attributes={"k": "v"}, message_id="m-9", acked=[], nacked=[])
    message.ack = lambda: message.acked.append(1)
    message.nack = lambda: message.nacked.append(1)

    def broken(_message) -> None:
        raise KeyError("trigger")

    router._guarded("eventarc-x", broken)(message)

    assert (message.acked, message.nacked) == ([1], [])
    [(_, data, attributes)] = router.publisher.published
    assert attributes == {"subscription": "eventarc-x"}
    assert json.loads(data)["message"] == {"data": "AA==", "attributes": {"k": "v"}, "messageId": "m-9"}


# -- delivery records ---------------------------------------------------------


def record(status: str, attempts: int) -> dict:
    event = OutgoingEvent({"ce-id": "1", "ce-type": "t", "ce-subject": "s"}, b"")
    return delivery_doc("trig", "fn", event, status, attempts, PUBLISHED)


def test_every_record_has_every_field():
    assert record("retrying", 1).keys() == record("delivered", 2).keys()
    assert {"published_at", "received_at", "posted_at", "answered_at"} <= record("delivered", 1).keys()


def test_coalesce_keeps_each_events_last_record_in_first_seen_order():
    batch = [("a", record("retrying", 1)), ("b", record("delivered", 1)), ("a", record("delivered", 2))]
    assert [(k, d["status"], d["attempts"]) for k, d in coalesce(batch).items()] == [("a", "delivered", 2), ("b", "delivered", 1)]


class FlakyLog:
    """A DeliveryLog whose first `failures` commits fail."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.commits: list[dict[str, dict]] = []

    def write(self, records: dict[str, dict]) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("firestore unavailable")
        self.commits.append(records)


def test_record_writer_acks_only_after_the_commit_and_retries_a_failed_one():
    log = FlakyLog(failures=2)
    writer = RecordWriter(log, retry_s=0)
    commits_when_acked = []
    acked = threading.Event()
    writer.put("a", record("delivered", 1), lambda: (commits_when_acked.append(len(log.commits)), acked.set()))
    assert acked.wait(10)
    writer.close()
    assert commits_when_acked == [1]
    assert [list(c) for c in log.commits] == [["a"]]


def test_record_writer_close_commits_what_is_queued():
    log = FlakyLog()
    writer = RecordWriter(log)
    acks = []
    for i in range(50):
        writer.put(f"k{i}", record("delivered", 1), lambda i=i: acks.append(i))
    writer.close()
    assert sorted(k for c in log.commits for k in c) == sorted(f"k{i}" for i in range(50))
    assert sorted(acks) == list(range(50))
