"""emulators.eventarc: emulator output -> production's binary-mode CloudEvents, decoded with the real types."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from google.events.cloud.firestore_v1 import ArrayValue, Document, DocumentEventData, MapValue, Value

from emulators.eventarc import STORAGE_EVENT_TYPES, OutgoingEvent, firestore_event, pubsub_event, rfc3339, storage_event
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
