"""What the emulators alone cost on a federation round's path, measured on a running local cloud.

Used by bench/federation.py after each federation, on the same stack. Three probes, each
with its own topic, subscription, bucket or document, so no fedpipe function sees them:

* ``pubsub_pull``: publish -> a streaming-pull subscriber's callback. The Pub/Sub
  emulator hands out messages on a 50 ms poll (``HANGING_PULL_POLLING_INTERVAL_MS`` and a
  ``Thread.sleep(50)`` in its streaming-pull pusher), so a message waits 0-50 ms.
  Messages go out at random gaps so they do not fall in step with that poll.
* ``storage_notification``: an upload returns -> fake-gcs-server's notification reaches a
  plain subscription on its topic. ``storage_publish`` is the part before the Pub/Sub
  emulator (upload returned -> the notification's publish time): fake-gcs-server's
  Go Pub/Sub client batches for a few milliseconds. This is the floor under a node's
  update reaching the hub (upload -> notification -> router -> hub function).
* ``firestore_listener``: a batch commit starts -> a document listener sees it, which is
  how a worker learns that the hub opened the next round.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid

from google.cloud import firestore, pubsub_v1, storage

from emulators.endpoints import GCS_NOTIFICATIONS_TOPIC
from shared.config import Settings


def _summary(values_ms: list[float]) -> dict:
    ordered = sorted(values_ms)
    return {"p50_ms": round(statistics.median(ordered), 1), "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
            "min_ms": round(ordered[0], 1), "n": len(ordered)}


def _wait(seen: dict, key: str, timeout_s: float = 5.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    while key not in seen and time.monotonic() < deadline:
        time.sleep(0.0005)
    return seen.get(key)


def pubsub_pull(settings: Settings, samples: int) -> dict:
    publisher = pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001))
    subscriber = pubsub_v1.SubscriberClient()
    tag = uuid.uuid4().hex[:8]
    topic = publisher.create_topic(name=publisher.topic_path(settings.project, f"bench-floor-{tag}")).name
    subscription = subscriber.create_subscription(name=subscriber.subscription_path(settings.project, f"bench-floor-{tag}"), topic=topic).name
    arrived: dict[str, float] = {}

    def on_message(message) -> None:
        arrived[message.data.decode()] = time.time()
        message.ack()

    stream = subscriber.subscribe(subscription, on_message)
    latencies = []
    try:
        time.sleep(0.5)
        for i in range(samples):
            time.sleep(random.uniform(0.02, 0.08))
            started = time.time()
            publisher.publish(topic, str(i).encode()).result(timeout=10)
            if (at := _wait(arrived, str(i))) is not None:
                latencies.append((at - started) * 1000)
    finally:
        stream.cancel()
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
    return _summary(latencies)


def storage_notification(settings: Settings, samples: int) -> tuple[dict, dict]:
    gcs = storage.Client(project=settings.project)
    subscriber = pubsub_v1.SubscriberClient()
    tag = uuid.uuid4().hex[:8]
    bucket = gcs.create_bucket(f"bench-floor-{tag}")  # no trigger listens to it: the router drops its events
    subscription = subscriber.create_subscription(
        name=subscriber.subscription_path(settings.project, f"bench-floor-gcs-{tag}"),
        topic=subscriber.topic_path(settings.project, GCS_NOTIFICATIONS_TOPIC),
    ).name
    arrived: dict[str, tuple[float, float]] = {}

    def on_message(message) -> None:
        if message.attributes.get("bucketId") == bucket.name and message.attributes.get("eventType") == "OBJECT_FINALIZE":
            arrived[message.attributes["objectId"]] = (time.time(), message.publish_time.timestamp())
        message.ack()

    stream = subscriber.subscribe(subscription, on_message)
    total, publish = [], []
    try:
        time.sleep(0.5)
        for i in range(samples):
            time.sleep(random.uniform(0.02, 0.08))
            blob = bucket.blob(f"o{i}")
            blob.upload_from_string(b"\0" * 20_000)  # about the size of the benchmark model's update
            uploaded = time.time()
            if (at := _wait(arrived, blob.name)) is not None:
                total.append((at[0] - uploaded) * 1000)
                publish.append((at[1] - uploaded) * 1000)
    finally:
        stream.cancel()
        subscriber.delete_subscription(subscription=subscription)
    return _summary(total), _summary(publish)


def firestore_listener(settings: Settings, samples: int) -> dict:
    db = firestore.Client(project=settings.project)
    ref = db.collection("bench-floor").document(uuid.uuid4().hex)
    ref.set({"n": -1})
    seen: dict[str, float] = {}
    ready = threading.Event()

    def on_snapshot(snapshots, _changes, _read_time) -> None:
        if snapshots and snapshots[0].exists:
            seen.setdefault(str(snapshots[0].get("n")), time.time())
            ready.set()

    watch = ref.on_snapshot(on_snapshot)
    latencies = []
    try:
        ready.wait(10)
        for i in range(samples):
            time.sleep(random.uniform(0.02, 0.08))
            batch = db.batch()
            batch.update(ref, {"n": i})
            started = time.time()
            batch.commit()
            if (at := _wait(seen, str(i))) is not None:
                latencies.append((at - started) * 1000)
    finally:
        watch.unsubscribe()
        ref.delete()
    return _summary(latencies)


def measure(settings: Settings, samples: int = 30) -> dict:
    """Each probe in turn on the running local cloud (its clients from the emulator variables)."""
    notification, publish = storage_notification(settings, samples)
    return {
        "pubsub_pull": pubsub_pull(settings, samples),
        "storage_notification": notification,
        "storage_publish": publish,
        "firestore_listener": firestore_listener(settings, samples),
    }
