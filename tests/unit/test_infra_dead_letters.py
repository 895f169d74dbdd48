"""`fedpipe events tail --project`: the deployed dead letters, read in place, their data never shown."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from google.pubsub_v1.types import PubsubMessage
from typer.testing import CliRunner

from fedpipe import dead_letters
from fedpipe.cli import app
from shared.config import Settings

pytestmark = pytest.mark.unit

SECRET = b"patient-4711,HbA1c=9.1"


def _letter(message_id: str, minute: int, **attributes: str) -> PubsubMessage:
    return PubsubMessage(data=SECRET, attributes=attributes, message_id=message_id,
                         publish_time=datetime(2026, 1, 2, 3, minute, tzinfo=UTC))


STORAGE = _letter(
    "m1", 5,
    eventType="OBJECT_FINALIZE", bucketId="acme-us-raw", objectId="ds/a.csv",
    CloudPubSubDeadLetterSourceSubscription="projects/acme-fl/subscriptions/fedpipe-raw-upload-us",
    CloudPubSubDeadLetterSourceDeliveryCount="5",
)


def test_a_dead_letter_names_its_source_attempts_and_event_but_not_its_data():
    letter = dead_letters.from_message(STORAGE)
    assert letter == dead_letters.DeadLetter(
        message_id="m1",
        published_at=datetime(2026, 1, 2, 3, 5, tzinfo=UTC),
        source="fedpipe-raw-upload-us",
        attempts=5,
        attributes={"bucketId": "acme-us-raw", "eventType": "OBJECT_FINALIZE", "objectId": "ds/a.csv"},
        data_bytes=len(SECRET),
    )
    # The local router's dead letters say their trigger instead.
    local = dead_letters.from_message(_letter("m2", 6, trigger="shard-ready"))
    assert (local.source, local.attempts) == ("shard-ready", None)
    # A count that is not a small number is not trusted.
    odd = dead_letters.from_message(_letter("m3", 7, CloudPubSubDeadLetterSourceDeliveryCount="1e99"))
    assert odd.attempts is None and odd.source == "?"


def test_attribute_values_are_bounded():
    letter = dead_letters.from_message(_letter("m4", 8, objectId="x" * 5000))
    assert len(letter.attributes["objectId"]) == dead_letters.MAX_ATTRIBUTE_CHARS


class FakeSubscriber:
    def __init__(self, messages: list[PubsubMessage]) -> None:
        self.messages = messages
        self.calls: list[tuple[str, dict]] = []

    def pull(self, request: dict, timeout: float):
        self.calls.append(("pull", request))
        received = [SimpleNamespace(ack_id=f"ack-{m.message_id}", message=m) for m in self.messages[: request["max_messages"]]]
        return SimpleNamespace(received_messages=received)

    def modify_ack_deadline(self, request: dict):
        self.calls.append(("modify_ack_deadline", request))

    def acknowledge(self, request: dict):  # pragma: no cover - must never be called
        raise AssertionError("peek must not take dead letters away")


def test_peek_hands_every_message_back_at_once_and_sorts_oldest_first():
    later, earlier = _letter("late", 9), _letter("early", 1)
    subscriber = FakeSubscriber([later, earlier])
    letters = dead_letters.peek(subscriber, "projects/acme-fl/subscriptions/fedpipe-dead-letter-hold", 10)
    assert [d.message_id for d in letters] == ["early", "late"]
    assert subscriber.calls == [
        ("pull", {"subscription": "projects/acme-fl/subscriptions/fedpipe-dead-letter-hold", "max_messages": 10}),
        ("modify_ack_deadline", {"subscription": "projects/acme-fl/subscriptions/fedpipe-dead-letter-hold",
                                 "ack_ids": ["ack-late", "ack-early"], "ack_deadline_seconds": 0}),
    ]
    with pytest.raises(ValueError, match="limit must be 1 to 1000"):
        dead_letters.peek(subscriber, "projects/acme-fl/subscriptions/x-hold", 1001)


def test_the_default_subscription_is_the_one_infra_creates():
    assert dead_letters.subscription_path("acme-fl", Settings()) == "projects/acme-fl/subscriptions/fedpipe-dead-letter-hold"
    for bad in ("", "Acme", "a/b", "x" * 40):
        with pytest.raises(ValueError, match="project id"):
            dead_letters.subscription_path(bad, Settings())
    with pytest.raises(ValueError, match="projects/<project>/subscriptions/<name>"):
        dead_letters.check_subscription("projects/acme-fl/topics/t")


def test_cli_refuses_a_bad_project_clearly_and_never_prints_data(monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["events", "tail", "--project", "Not/A/Project"])
    assert result.exit_code == 1
    assert "project id" in result.output

    subscriber = FakeSubscriber([STORAGE])
    monkeypatch.setattr("google.cloud.pubsub_v1.SubscriberClient", lambda: subscriber)
    result = runner.invoke(app, ["events", "tail", "--project", "acme-fl"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "fedpipe-raw-upload-us" in result.output and "ds/a.csv" in result.output
    assert SECRET.decode() not in result.output and "patient-4711" not in result.output
