"""Pure conversions from what the emulators emit to production's binary-mode CloudEvents.

Each function returns the headers and body Eventarc would POST to a Cloud Run
service, so functions see the same events locally as in production. An event's
headers hold the attribute values as text; `wire_headers` encodes them for HTTP.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from shared.triggers import FIRESTORE_WRITTEN, PUBSUB_PUBLISHED

STORAGE_EVENT_TYPES = {
    "OBJECT_FINALIZE": "google.cloud.storage.object.v1.finalized",
    "OBJECT_DELETE": "google.cloud.storage.object.v1.deleted",
    "OBJECT_METADATA_UPDATE": "google.cloud.storage.object.v1.metadataUpdated",
    "OBJECT_ARCHIVE": "google.cloud.storage.object.v1.archived",
}

# Printable US-ASCII (U+0021-U+007E) but the double-quote and the percent sign: what the
# CloudEvents HTTP binding lets through a header value unencoded.
HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def header_value(value: str) -> str:
    """An attribute value as an HTTP header value (CloudEvents HTTP binding v1.0.2, 3.1.3.2).

    HTTP headers carry printable ASCII only, and an object name is any UTF-8: sending
    `objects/unicode_näme_数据.csv` as it is raises UnicodeEncodeError in http.client. The
    binding percent-encodes the UTF-8 bytes of every other character, and space, `"` and
    `%` too, so percent-decoding gives the value back exactly.
    """
    return quote(value, safe=HEADER_SAFE)


def wire_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers of a binary-mode CloudEvent as POSTed: every `ce-` attribute percent-encoded."""
    return {k: header_value(v) if k.startswith("ce-") else v for k, v in headers.items()}


def emulator_header_text(value: str) -> str:
    """A header value from the Firestore emulator, as the text it stands for.

    The emulator sends a document id such as `jöb 数` as raw UTF-8 bytes, not percent-encoded
    (a literal `%` stays `%`), and http.server reads header bytes as Latin-1, so `jöb` arrives
    as `jÃ¶b`. Reading the same bytes as UTF-8 gives the id back; a value that is not UTF-8
    is kept as read.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


@dataclass(frozen=True)
class OutgoingEvent:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["ce-id"]

    @property
    def type(self) -> str:
        return self.headers["ce-type"]

    @property
    def subject(self) -> str:
        return self.headers.get("ce-subject", "")

    def to_json(self) -> dict:
        return {"headers": self.headers, "body": base64.b64encode(self.body).decode()}

    @classmethod
    def from_json(cls, doc: dict) -> OutgoingEvent:
        return cls(headers=dict(doc["headers"]), body=base64.b64decode(doc["body"]))


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def storage_event(data: bytes, attributes: dict[str, str], message_id: str, publish_time: datetime) -> OutgoingEvent | None:
    """A GCS Pub/Sub notification as Eventarc's storage CloudEvent; None for unknown event kinds."""
    event_type = STORAGE_EVENT_TYPES.get(attributes.get("eventType", ""))
    if event_type is None:
        return None
    obj = json.loads(data)
    bucket = attributes.get("bucketId") or obj["bucket"]
    name = attributes.get("objectId") or obj["name"]
    headers = {
        "ce-specversion": "1.0",
        "ce-id": message_id,
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-type": event_type,
        "ce-subject": f"objects/{name}",
        "ce-time": obj.get("updated") or rfc3339(publish_time),
        "ce-bucket": bucket,
        "content-type": "application/json",
    }
    return OutgoingEvent(headers, json.dumps(obj).encode())


def pubsub_event(
    project: str, topic: str, subscription: str, data: bytes, attributes: dict[str, str], message_id: str, publish_time: datetime
) -> OutgoingEvent:
    """A Pub/Sub message as Eventarc's messagePublished CloudEvent (both field spellings, as production)."""
    published = rfc3339(publish_time)
    message = {
        "data": base64.b64encode(data).decode(),
        "attributes": attributes,
        "messageId": message_id,
        "message_id": message_id,
        "publishTime": published,
        "publish_time": published,
    }
    headers = {
        "ce-specversion": "1.0",
        "ce-id": message_id,
        "ce-source": f"//pubsub.googleapis.com/projects/{project}/topics/{topic}",
        "ce-type": PUBSUB_PUBLISHED,
        "ce-time": published,
        "content-type": "application/json",
    }
    body = {"message": message, "subscription": f"projects/{project}/subscriptions/{subscription}"}
    return OutgoingEvent(headers, json.dumps(body).encode())


def firestore_event(project: str, headers: dict[str, str], body: bytes, location: str) -> OutgoingEvent:
    """The Firestore emulator's own CloudEvent, mended to production's shape.

    The emulator sends the DocumentEventData protobuf as base64 text, a source with a
    doubled `projects/` segment and header values as raw UTF-8; production sends raw
    protobuf bytes, a clean source, and the location/project/database/namespace extensions.
    """
    # ce-datacontenttype is not a binary-mode header: the content type travels as Content-Type.
    ce = {
        k.lower(): emulator_header_text(v) for k, v in headers.items() if k.lower().startswith("ce-") and k.lower() != "ce-datacontenttype"
    }
    database = ce.get("ce-database", "(default)")
    out = {
        **ce,
        "ce-specversion": "1.0",
        "ce-type": ce.get("ce-type", FIRESTORE_WRITTEN),
        "ce-source": f"//firestore.googleapis.com/projects/{project}/databases/{database}",
        "ce-project": project,
        "ce-database": database,
        "ce-namespace": ce.get("ce-namespace", "(default)"),
        "ce-location": location,
        "content-type": "application/protobuf",
    }
    if "ce-document" not in out and out.get("ce-subject", "").startswith("documents/"):
        out["ce-document"] = out["ce-subject"].removeprefix("documents/")
    # A DocumentEventData message starts with field 1 or 2 (bytes 0x0a, 0x12); base64 text never does.
    payload = body if body[:1] in (b"\x0a", b"\x12") else base64.b64decode(body.strip())
    return OutgoingEvent(out, payload)
