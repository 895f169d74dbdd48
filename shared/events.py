"""Decode the CloudEvents fedpipe's functions receive, with google-events' own types.

The same decoding serves production (Eventarc) and the local router, which sends
the same shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.events.cloud.firestore_v1 import Document, DocumentEventData, Value
from google.events.cloud.pubsub_v1 import MessagePublishedData
from google.events.cloud.storage_v1 import StorageObjectData

from shared.ingest import RawObject


def storage_object(data: dict | bytes | str) -> RawObject:
    """The object of a `google.cloud.storage.object.v1.*` event."""
    raw = data if isinstance(data, (str, bytes)) else json.dumps(data)
    obj = StorageObjectData.from_json(raw, ignore_unknown_fields=True)
    return RawObject(bucket=obj.bucket, name=obj.name, generation=obj.generation, size=obj.size, metadata=dict(obj.metadata))


@dataclass(frozen=True)
class PubSubMessage:
    data: bytes
    attributes: dict[str, str]
    message_id: str


def pubsub_message(data: dict | bytes | str) -> PubSubMessage:
    """The message of a `google.cloud.pubsub.topic.v1.messagePublished` event."""
    raw = data if isinstance(data, (str, bytes)) else json.dumps(data)
    published = MessagePublishedData.from_json(raw, ignore_unknown_fields=True)
    msg = published.message
    return PubSubMessage(data=msg.data, attributes=dict(msg.attributes), message_id=msg.message_id)


@dataclass(frozen=True)
class DocumentChange:
    """A Firestore write: the document's path (e.g. `jobs/a1`) and its fields before and after."""

    path: str
    before: dict | None
    after: dict | None

    @property
    def id(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def document_change(data: bytes) -> DocumentChange:
    """Decode a `google.cloud.firestore.document.v1.*` event (DocumentEventData protobuf)."""
    event = DocumentEventData()
    event._pb.ParseFromString(data)
    doc = event.value if event.value.name else event.old_value
    path = doc.name.split("/documents/", 1)[-1]
    return DocumentChange(path=path, before=_fields(event.old_value), after=_fields(event.value))


def _fields(doc: Document) -> dict | None:
    if not doc.name:
        return None
    return {name: _value(value) for name, value in doc.fields.items()}


def _value(value: Value):
    kind = Value.pb(value).WhichOneof("value_type")
    match kind:
        case "map_value":
            return {k: _value(v) for k, v in value.map_value.fields.items()}
        case "array_value":
            return [_value(v) for v in value.array_value.values]
        case "null_value" | None:
            return None
        case "integer_value":
            return int(value.integer_value)
        case "timestamp_value":
            return value.timestamp_value
        case _:
            return getattr(value, kind)
