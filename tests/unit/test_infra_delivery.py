"""Production delivery (infra/delivery.tf, main.tf): the same CloudEvents as locally, and dead letters.

Production and the local stack deliver the same CloudEvent formats to the same
handlers. Storage and Firestore triggers are Eventarc triggers
(google.cloud.storage.object.v1.finalized, ...firestore.document.v1.written),
whose Eventarc-owned subscriptions get the dead-letter policy from
scripts/eventarc-dead-letter.sh; Pub/Sub triggers are our own push
subscriptions with a dead_letter_policy (their messagePublished event is the
same either way). These tests evaluate that wiring for every rendered trigger,
and pin that functions-framework turns a push into the CloudEvent our handlers decode.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from emulators.eventarc import storage_event
from shared.config import Settings
from shared.events import pubsub_message, storage_object
from shared.infra_render import render
from shared.triggers import STORAGE_FINALIZED
from tests.unit.infra_hcl import resources_and_locals

pytestmark = pytest.mark.unit

INFRA = Path(__file__).resolve().parents[2] / "infra"
NODES = ("us", "eu", "ch")
RENDER = render(Settings(project="acme-fl", nodes=NODES))

RECORDER = textwrap.dedent(
    """
    import functions_framework

    received = []

    @functions_framework.cloud_event
    def record(cloud_event):
        received.append(cloud_event)
    """
)


@pytest.fixture
def pushed(tmp_path):
    """POST a Pub/Sub push body to a cloud_event function; the CloudEvent it got."""
    functions_framework = pytest.importorskip("functions_framework")
    source = tmp_path / "main.py"
    source.write_text(RECORDER)
    client = functions_framework.create_app("record", str(source), "cloudevent").test_client()
    # functions-framework imported the source as a module of its own: find its list.
    (recorder,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(source)]

    def push(path: str, body: dict):
        response = client.post(path, json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        return recorder.received.pop()

    return push


def _push_body(data: bytes, attributes: dict[str, str], message_id: str = "1234") -> dict:
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": message_id,
            "publishTime": "2026-01-02T03:04:05.000Z",
        },
        "subscription": "projects/acme/subscriptions/fedpipe-shard-ready",
    }


def test_a_pubsub_push_becomes_the_message_published_event_handlers_decode(pushed):
    event = pushed("/projects/acme/topics/shard-ready", _push_body(b'{"node": "us"}', {"node": "us", "dataset": "d"}))
    assert event["type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert event["source"] == "//pubsub.googleapis.com/projects/acme/topics/shard-ready"
    assert event["id"] == "1234"  # the message id: a redelivery has the same id
    message = pubsub_message(event.data)
    assert message.data == b'{"node": "us"}'
    assert message.attributes == {"node": "us", "dataset": "d"}
    assert message.message_id == "1234"


def test_a_storage_function_gets_eventarcs_finalized_event_as_locally(tmp_path):
    """What the local router sends a storage function is Eventarc's storage event, which production sends too."""
    functions_framework = pytest.importorskip("functions_framework")
    source = tmp_path / "main.py"
    source.write_text(RECORDER)
    client = functions_framework.create_app("record", str(source), "cloudevent").test_client()
    (recorder,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(source)]

    obj = {"bucket": "acme-us-raw", "name": "ds/a.csv", "generation": "17", "size": "42", "updated": "2026-01-02T03:04:05.000Z"}
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "acme-us-raw", "objectId": "ds/a.csv", "objectGeneration": "17"}
    outgoing = storage_event(json.dumps(obj).encode(), attributes, "77", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    response = client.post("/", headers=outgoing.headers, data=outgoing.body)
    assert response.status_code == 200, response.get_data(as_text=True)
    event = recorder.received.pop()
    # The event type infra subscribes each storage trigger to (event_trigger.event_type = the rendered trigger's).
    assert event["type"] == STORAGE_FINALIZED == {t["event_type"] for t in RENDER["triggers"] if t["kind"] == "storage"}.pop()
    assert event["source"] == "//storage.googleapis.com/projects/_/buckets/acme-us-raw"
    assert event["subject"] == "objects/ds/a.csv"
    raw = storage_object(event.data)
    assert (raw.bucket, raw.name) == ("acme-us-raw", "ds/a.csv")


def _block(text: str, header: str) -> str:
    start = text.index(header)
    end = re.compile(r"^\}", re.MULTILINE).search(text, start).end()
    return text[start:end]


def test_every_push_subscription_dead_letters_and_authenticates():
    delivery = (INFRA / "delivery.tf").read_text()
    sub = _block(delivery, 'resource "google_pubsub_subscription" "trigger" {')
    assert "for_each = local.push_triggers" in sub
    assert re.search(r"dead_letter_topic\s+= google_pubsub_topic\.topic\[var\.topics\.dead_letter\]\.id", sub)
    assert "max_delivery_attempts = var.max_delivery_attempts" in sub
    # The path names the topic (the CloudEvent's source, as above); the token is the delivery identity's.
    assert "/projects/${var.project}/topics/${each.value.topic}" in sub
    assert "service_account_email = google_service_account.delivery.email" in sub
    assert "audience              = google_cloudfunctions2_function.fn[each.key].service_config[0].uri" in sub
    # A push waits for the answer up to the ack deadline: not shorter than the function may run.
    ack = int(re.search(r"ack_deadline_seconds\s+= (\d+)", sub).group(1))
    timeout = int(re.search(r'variable "function_timeout_seconds" \{.*?default\s+= (\d+)', (INFRA / "variables.tf").read_text(), re.DOTALL).group(1))
    assert ack >= timeout
    # Each Eventarc trigger's subscription gets the same policy from the script.
    script = (INFRA / "scripts" / "eventarc-dead-letter.sh").read_text()
    assert "--dead-letter-topic=" in script and "--max-delivery-attempts=" in script and "roles/pubsub.subscriber" in script
    hold = _block(delivery, 'resource "google_pubsub_subscription" "dead_letter" {')
    assert 'name                       = "${var.topics.dead_letter}-hold"' in hold and "retain_acked_messages      = true" in hold


def test_max_delivery_attempts_is_bounded_like_pubsub():
    variables = (INFRA / "variables.tf").read_text()
    block = _block(variables, 'variable "max_delivery_attempts" {')
    assert "var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100" in block
    assert re.search(r"default\s+= 5\b", block)


# ---------------------------------------------------------------- the wiring, by value


@pytest.fixture(scope="module")
def tf() -> dict:
    return resources_and_locals()


def _kind_filter(expr: str) -> tuple[str, str]:
    """`{ for name, t in local.triggers : name => t if t.kind <op> "<kind>" }` -> (op, kind)."""
    m = re.fullmatch(r'\$\{\{for name, t in local\.triggers : name => t if t\.kind (==|!=) "(\w+)"\}\}', expr)
    assert m, expr
    return m.group(1), m.group(2)


def _selects(expr: str, trigger: dict) -> bool:
    op, kind = _kind_filter(expr)
    return (trigger["kind"] == kind) == (op == "==")


def _event_filters(expr: str) -> dict[str, list[dict]]:
    """local.event_filters, parsed: kind -> [{attribute, value expression, operator}]."""
    assert expr.startswith("${merge(") and expr.endswith(")}"), expr
    per_kind = re.findall(r'\{for name, t in local\.eventarc_triggers : name => \[(.*?)\] if t\.kind == "(\w+)"\}', expr)
    assert per_kind, expr
    out = {}
    for body, kind in per_kind:
        filters = re.findall(r'\{attribute = "([\w.-]+)", value = ([^,]+), operator = ([^}]+)\}', body)
        assert filters, body
        out[kind] = [{"attribute": a, "value": v.strip(), "operator": o.strip()} for a, v, o in filters]
    return out


def _value(expr: str, trigger: dict) -> str:
    if expr.startswith("t."):
        return trigger[expr[2:]]
    if expr == "google_firestore_database.db.name":
        return "firestore:(database)"
    raise AssertionError(f"unknown filter value {expr!r}")


def _operator(expr: str) -> str | None:
    return None if expr == "null" else expr.strip('"')


def wiring(tf: dict) -> dict[str, dict]:
    """Every rendered trigger of a three-node deployment: how it is delivered, as Terraform would build it."""
    resources, locals_ = tf["resources"], tf["locals"]
    fn = resources[("google_cloudfunctions2_function", "fn")]
    (dynamic,) = fn["dynamic"]
    trigger_block = dynamic["event_trigger"]
    assert trigger_block["for_each"] == '${each.value.kind != "pubsub" ? [each.value] : []}'
    (content,) = trigger_block["content"]
    assert content["event_type"] == "${event_trigger.value.event_type}"  # each.value, i.e. the rendered trigger
    assert content["trigger_region"] == "${local.trigger_region[each.key]}"
    _check_trigger_region(locals_)
    (filters_block,) = content["dynamic"]
    assert filters_block["event_filters"]["for_each"] == "${local.event_filters[each.key]}"
    filters = _event_filters(locals_["event_filters"])
    trigger_identity = re.fullmatch(r"\$\{google_service_account\.(\w+)\.email\}", content["service_account_email"]).group(1)

    sub = resources[("google_pubsub_subscription", "trigger")]
    assert sub["for_each"] == "${local.push_triggers}"
    (dead_letter,) = sub["dead_letter_policy"]
    (push,) = sub["push_config"]
    (oidc,) = push["oidc_token"]
    push_identity = re.fullmatch(r"\$\{google_service_account\.(\w+)\.email\}", oidc["service_account_email"]).group(1)
    assert sub["topic"] == "${google_pubsub_topic.topic[each.value.topic].id}"

    out = {}
    for t in RENDER["triggers"]:
        eventarc = _selects(locals_["eventarc_triggers"], t)
        pushed = _selects(locals_["push_triggers"], t)
        assert eventarc == (t["kind"] != "pubsub")  # the dynamic block's for_each, for this trigger
        entry = {"kind": t["kind"]}
        if eventarc:
            entry["eventarc"] = {
                "event_type": t["event_type"],
                "filters": [
                    (f["attribute"], _value(f["value"], t), _operator(f["operator"])) for f in filters[t["kind"]]
                ],
                "trigger_identity": trigger_identity,
            }
        if pushed:
            entry["push"] = {
                "topic": t["topic"],
                "identity": push_identity,
                "dead_letter_topic": dead_letter["dead_letter_topic"],
                "max_delivery_attempts": dead_letter["max_delivery_attempts"],
            }
        out[t["name"]] = entry
    return out


def _check_trigger_region(locals_: dict) -> None:
    """A storage trigger lives in its bucket's region, the Firestore trigger in the database's location."""
    assert locals_["trigger_region"] == (
        '${{for name, t in local.eventarc_triggers : name => (t.kind == "firestore" ? '
        "local.firestore_location : local.bucket_region[t.bucket])}}"
    )
    assert "(var.hub_bucket) = var.region" in locals_["bucket_region"]


def test_storage_triggers_are_eventarc_finalized_triggers_on_their_bucket(tf):
    w = wiring(tf)
    nodes = RENDER["nodes"]
    expected_buckets = {**{f"raw-upload-{n}": nodes[n]["raw_bucket"] for n in NODES}, "hub-upload": RENDER["hub_bucket"]}
    storage = {name: e for name, e in w.items() if e["kind"] == "storage"}
    assert set(storage) == set(expected_buckets)
    for name, entry in storage.items():
        assert "push" not in entry, f"{name}: a storage trigger must reach its function as Eventarc's storage event"
        assert entry["eventarc"] == {
            "event_type": "google.cloud.storage.object.v1.finalized",
            "filters": [("bucket", expected_buckets[name], None)],
            "trigger_identity": "delivery",
        }
    # The functions they target run as the node's ingest identity (raw buckets) or the hub (hub bucket).
    fn = tf["resources"][("google_cloudfunctions2_function", "fn")]
    assert fn["service_config"][0]["service_account_email"] == "${local.function_identity[each.key]}"
    raw_bucket_node = {b["raw_bucket"]: node for node, b in nodes.items()}
    runs_as = {name: f"ingest:{raw_bucket_node[b]}" if b in raw_bucket_node else "hub" for name, b in expected_buckets.items()}
    assert runs_as == {**{f"raw-upload-{n}": f"ingest:{n}" for n in NODES}, "hub-upload": "hub"}
    # No notification topics or notifications of our own any more.
    assert not [k for k in tf["resources"] if k[0] == "google_storage_notification"]
    assert ("google_pubsub_topic", "storage_events") not in tf["resources"]


def test_pubsub_triggers_are_push_subscriptions_with_a_dead_letter_policy(tf):
    w = wiring(tf)
    pubsub = {name: e for name, e in w.items() if e["kind"] == "pubsub"}
    assert set(pubsub) == {"shard-ready", "tick"}
    for name, entry in pubsub.items():
        assert "eventarc" not in entry, name
        assert entry["push"] == {
            "topic": {"shard-ready": RENDER["topics"]["shard_ready"], "tick": RENDER["topics"]["tick"]}[name],
            "identity": "delivery",
            "dead_letter_topic": "${google_pubsub_topic.topic[var.topics.dead_letter].id}",
            "max_delivery_attempts": "${var.max_delivery_attempts}",
        }


def test_the_firestore_trigger_is_eventarc_and_every_eventarc_trigger_gets_the_dead_letter_script(tf):
    w = wiring(tf)
    assert w["job-written"] == {
        "kind": "firestore",
        "eventarc": {
            "event_type": "google.cloud.firestore.document.v1.written",
            "filters": [("database", "firestore:(database)", None), ("document", "jobs/{jobId}", "match-path-pattern")],
            "trigger_identity": "delivery",
        },
    }
    # Every trigger has exactly one transport.
    assert all(("eventarc" in e) != ("push" in e) for e in w.values())
    script = tf["resources"][("terraform_data", "eventarc_dead_letter")]
    assert script["for_each"] == "${var.eventarc_dead_letter ? local.eventarc_triggers : {}}"
    with_script = {name for name, e in w.items() if "eventarc" in e}
    assert with_script == {*(f"raw-upload-{n}" for n in NODES), "hub-upload", "job-written"}
    (provisioner,) = script["provisioner"]
    env = provisioner["local-exec"]["environment"]
    assert env["EVENTARC_TRIGGER"] == "${google_cloudfunctions2_function.fn[each.key].event_trigger[0].trigger}"
    assert env["DEAD_LETTER_TOPIC"] == "${google_pubsub_topic.topic[var.topics.dead_letter].id}"
    assert env["MAX_DELIVERY_ATTEMPTS"] == "${tostring(var.max_delivery_attempts)}"
