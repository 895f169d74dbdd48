"""Ingest against the real local cloud: the names users give files, duplicate storms, and
shard-ready messages that ingest did not write."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from emulators.endpoints import GCS_NOTIFICATIONS_TOPIC
from fedpipe.demo import csv_bytes, load_table
from shared.datasets import MAX_OBJECT_NAME_BYTES, SPEC_OBJECT, FeatureStats, file_key
from shared.manifest import ShardReady, processed_prefix
from shared.quarantine import QuarantineStore
from tests.conftest import wait_for
from tests.emulator.helpers import dataset_doc, delivered, deliveries

pytestmark = pytest.mark.emulator


def upload_parts(clients, dataset: str, names: list[str], node: str = "us") -> None:
    """The digits data set cut into one file per name, declared (no training), then uploaded."""
    table, features, num_classes = load_table("digits")
    step = table.num_rows // len(names)
    bucket = clients.gcs.bucket(clients.settings.raw_bucket(node))
    spec = {"features": features, "label": "label", "num_classes": num_classes, "expected_files": names, "train_on_complete": False}
    bucket.blob(f"{dataset}/{SPEC_OBJECT}").upload_from_string(json.dumps(spec, ensure_ascii=False))
    for i, name in enumerate(names):
        bucket.blob(f"{dataset}/{name}").upload_from_string(csv_bytes(table.slice(i * step, step)))


def shard_ready_deliveries(clients, dataset: str) -> list[dict]:
    def names_dataset(record: dict) -> bool:
        import base64

        if record["trigger"] != "shard-ready":
            return False
        message = json.loads(base64.b64decode(record["event"]["body"]))["message"]
        return message.get("attributes", {}).get("dataset") == dataset

    return deliveries(clients, names_dataset)


def refusals(clients, dataset: str) -> list:
    return [r for r in QuarantineStore(clients.db, clients.settings).recent(dataset=dataset) if r.source.startswith("pubsub://")]


def test_files_named_as_users_name_them_complete_their_data_set(cloud, clients):
    long_name = "長" * ((MAX_OBJECT_NAME_BYTES - len("names/") - len(".csv")) // 3) + ".csv"
    assert len(f"names/{long_name}".encode()) <= MAX_OBJECT_NAME_BYTES
    names = ["unicode_näme_数据.csv", "spaces in name.csv", "__x__.csv", long_name]
    upload_parts(clients, "names", names)

    doc = wait_for(lambda: (d := dataset_doc(clients, "us", "names")).get("status") == "complete" and d, 60, "the data set complete")
    assert set(doc["files"]) == set(names)
    assert doc["rows"] == (1797 // 4) * 4
    for name in names:
        record = clients.db.collection("datasets").document("us~names").collection("files").document(file_key(name)).get()
        assert (record.get("name"), record.get("status")) == (name, "processed")
    # Each upload was delivered once and never retried: no hot redelivery loop on any name.
    uploads = delivered(clients, lambda r: r["trigger"] == "raw-upload-us" and "names/" in r["subject"], len(names) + 1)
    assert len(uploads) == len(names) + 1
    assert {(r["status"], r["attempts"]) for r in uploads} == {("delivered", 1)}


def test_concurrent_duplicate_events_process_a_file_once(cloud, clients):
    upload_parts(clients, "storm", ["a.csv", "b.csv"])
    wait_for(lambda: dataset_doc(clients, "us", "storm").get("status") == "complete", 60, "the data set complete")
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    table, _, _ = load_table("digits")
    blob = bucket.blob("storm/b.csv")
    blob.upload_from_string(csv_bytes(table.slice(0, 500)))  # a new generation, and at once a storm of its notification
    blob.reload()
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": bucket.name, "objectId": blob.name,
                  "objectGeneration": str(blob.generation), "payloadFormat": "JSON_API_V1"}
    topic = clients.publisher.topic_path(clients.settings.project, GCS_NOTIFICATIONS_TOPIC)
    payload = json.dumps(blob._properties).encode()
    with ThreadPoolExecutor(8) as pool:
        storm = set(pool.map(lambda _: clients.publisher.publish(topic, payload, **attributes).result(), range(8)))
    wait_for(lambda: {r["event_id"] for r in deliveries(clients, lambda r: r["event_id"] in storm and r["status"] == "delivered")} == storm,
             60, "every duplicate delivered")
    wait_for(lambda: dataset_doc(clients, "us", "storm")["files"]["b.csv"]["generation"] == blob.generation, 60, "the new upload recorded")

    published = wait_for(lambda: len(found := shard_ready_deliveries(clients, "storm")) >= 3 and found, 30, "three shard-ready records")
    assert len(published) == 2 + 1  # one per upload: a.csv, b.csv, and b.csv's new generation; none from the storm
    versions = list(clients.db.collection("datasets").document("us~storm").collection("versions").stream())
    assert len(versions) == 2


def _publish(clients, ready: ShardReady) -> str:
    topic = clients.publisher.topic_path(clients.settings.project, clients.settings.shard_ready_topic)
    return clients.publisher.publish(topic, ready.model_dump_json().encode(), node=ready.node, dataset=ready.dataset).result()


def _acknowledged_once(clients, message_id: str) -> dict:
    record = wait_for(lambda: deliveries(clients, lambda r: r["event_id"] == message_id), 30, "the delivery")[0]
    assert (record["status"], record["attempts"]) == ("delivered", 1)
    return record


def test_a_shard_ready_message_for_an_undeclared_data_set_is_refused_once(cloud, clients):
    ghost = ShardReady(node="us", dataset="ghost", file="f.csv", generation=1, source="gs://x/ghost/f.csv", rows=1,
                       shards=[f"gs://{clients.settings.processed_bucket('us')}/{processed_prefix('ghost', 'f.csv', 1, 0)}/shard-00000.parquet"],
                       stats=FeatureStats(count=1, mean=[0.0], m2=[0.0], label_counts=[1, 0]))
    message_id = _publish(clients, ghost)
    _acknowledged_once(clients, message_id)
    [refused] = wait_for(lambda: refusals(clients, "ghost"), 30, "the refusal recorded")
    assert (refused.reason, refused.node, refused.source) == ("no_such_upload", "us", f"pubsub://shard-ready/{message_id}")
    assert list(clients.db.collection("datasets").document("us~ghost").collection("manifest").stream()) == []  # no orphan entry


def test_shard_ready_messages_ingest_did_not_write_change_nothing(cloud, clients):
    upload_parts(clients, "forged", ["a.csv", "b.csv"])
    before = wait_for(lambda: (d := dataset_doc(clients, "us", "forged")).get("status") == "complete" and d, 60, "the data set complete")
    entry = clients.db.collection("datasets").document("us~forged").collection("manifest").document(file_key("a.csv")).get().to_dict()
    genuine = ShardReady(node="us", dataset="forged", file="a.csv", generation=entry["generation"], spec_generation=entry["spec_generation"],
                         source=entry["source"], rows=entry["rows"], shards=entry["shards"], stats=FeatureStats.model_validate(entry["stats"]))
    eu_shard = entry["shards"][0].replace(clients.settings.processed_bucket("us"), clients.settings.processed_bucket("eu"))
    later = entry["generation"] + 10**9
    later_prefix = f"gs://{clients.settings.processed_bucket('us')}/{processed_prefix('forged', 'a.csv', later, entry['spec_generation'])}"
    forgeries = {
        "foreign_shards": genuine.model_copy(update={"shards": [eu_shard]}),
        "generation_mismatch": genuine.model_copy(update={"generation": later, "shards": [f"{later_prefix}/shard-00000.parquet"]}),
        "not_from_ingest": genuine.model_copy(update={"rows": 10**6}),
    }
    ids = {reason: _publish(clients, forged) for reason, forged in forgeries.items()}
    for message_id in ids.values():
        _acknowledged_once(clients, message_id)
    recorded = wait_for(lambda: len(r := refusals(clients, "forged")) == 3 and r, 30, "three refusals")
    assert {r.source.rsplit("/", 1)[1]: r.reason for r in recorded} == {i: reason for reason, i in ids.items()}
    after = dataset_doc(clients, "us", "forged")
    assert (after["version"], after["files"], after["rows"]) == (before["version"], before["files"], before["rows"])
