"""The trigger router: local Eventarc, driven by the trigger declaration in shared/triggers.py.

Storage triggers share one subscription to fake-gcs-server's notification topic,
Pub/Sub triggers get a subscription each, and Firestore triggers are registered with
the emulator, whose fire-and-forget POSTs are parked on an internal topic before they
are acknowledged, so no event is lost while a function is down. Every event is then
POSTed as a binary-mode CloudEvent, on threads of its trigger's own; a non-2xx answer,
or any failure to POST, is retried with exponential backoff and, after the last
attempt, dead-lettered. Each outcome is recorded (emulators/deliveries.py) off the
event's path, and the message acked once its record is committed. Run as
`python -m emulators.router`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from google.api_core.exceptions import AlreadyExists
from google.cloud import firestore, pubsub_v1

from emulators.deliveries import DeliveryLog, RecordWriter, delivery_doc, record_id
from emulators.endpoints import (
    FIRESTORE_EVENTS_TOPIC,
    GCS_NOTIFICATIONS_TOPIC,
    REPLAY_TOPIC,
    default_state_dir,
)
from emulators.eventarc import (
    OutgoingEvent,
    firestore_event,
    pubsub_event,
    storage_event,
    wire_headers,
)
from emulators.reaper import run_reaper
from emulators.router_config import RouterConfig
from shared.config import Settings
from shared.jobs import utcnow
from shared.triggers import Trigger, triggers

log = logging.getLogger("fedpipe.router")

# Events one trigger delivers at once, each on a thread that waits out the POST and the backoff.
DELIVERY_THREADS = 10
# Messages a subscription holds unacked. An ack waits for the delivery's record, committed in
# batches some 100 ms apart in a burst: a window of 64 capped a burst near 64 events per commit.
MAX_OUTSTANDING = 1000


class Router:
    def __init__(self, config: RouterConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.triggers = {t.name: t for t in triggers(settings)}
        self.publisher = pubsub_v1.PublisherClient(
            # Firestore events wait on this publish before the emulator gets its 200: keep batches tiny.
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001)
        )
        self.subscriber = pubsub_v1.SubscriberClient()
        self.records = RecordWriter(DeliveryLog(firestore.Client(project=settings.project)))
        # Each trigger delivers on its own threads, as when each had its own subscription: one whose
        # function fails sleeps through its backoff there, and holds up no other trigger.
        self._delivery_threads = {
            name: ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix=f"deliver-{name}") for name in self.triggers
        }
        self._local = threading.local()
        self._stop = threading.Event()
        self._futures: list = []

    # -- set-up ---------------------------------------------------------------

    def _topic(self, name: str) -> str:
        return self.publisher.topic_path(self.settings.project, name)

    def _subscribe(self, subscription: str, topic: str, callback) -> None:
        path = self.subscriber.subscription_path(self.settings.project, subscription)
        try:
            self.subscriber.create_subscription(name=path, topic=self._topic(topic), ack_deadline_seconds=60)
        except AlreadyExists:
            pass
        flow = pubsub_v1.types.FlowControl(max_messages=MAX_OUTSTANDING)
        self._futures.append(self.subscriber.subscribe(path, self._guarded(subscription, callback), flow_control=flow))

    def _register_firestore_trigger(self, trigger: Trigger) -> None:
        host = os.environ["FIRESTORE_EMULATOR_HOST"]
        body = {
            "eventType": trigger.event_type,
            "database": "(default)",
            "namespace": "(default)",
            "document": {"value": trigger.document, "matchType": "PATH_PATTERN"},
        }
        url = f"http://{host}/emulator/v1/projects/{self.settings.project}/eventarcTrigger?eventarcTriggerId={trigger.name}"
        requests.post(url, json=body, timeout=10).raise_for_status()

    def start(self) -> None:
        # One subscription per source topic, not per trigger: every notification on a shared topic
        # cost each trigger's subscription a receive, a lease and an ack, only to be dropped by all
        # but one of them (see _on_storage_notification).
        storage = [t for t in self.triggers.values() if t.kind == "storage"]
        self._subscribe("eventarc-storage", GCS_NOTIFICATIONS_TOPIC, self._on_storage_notification(storage))
        for trigger in self.triggers.values():
            if trigger.kind == "pubsub":
                subscription = f"eventarc-{trigger.name}"
                self._subscribe(subscription, trigger.topic, self._on_pubsub_message(trigger, subscription))
        # The emulator POSTs only after its trigger is registered, and parks what it POSTs on this topic.
        self._subscribe("eventarc-firestore", FIRESTORE_EVENTS_TOPIC, self._on_stored_event)
        for trigger in self.triggers.values():
            if trigger.kind == "firestore":
                self._register_firestore_trigger(trigger)
        self._subscribe("eventarc-replay", REPLAY_TOPIC, self._on_stored_event)
        self.http = ThreadingHTTPServer(("127.0.0.1", self.config.port), self._handler())
        threading.Thread(target=self.http.serve_forever, daemon=True, name="firestore-intake").start()
        threading.Thread(
            target=run_reaper,
            args=(self.settings, self.config.reaper_interval_s, default_state_dir(), self._stop),
            daemon=True,
            name="reaper",
        ).start()

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.cancel()
        self.http.shutdown()
        for threads in self._delivery_threads.values():
            # Deliveries not yet begun are dropped unacked: Pub/Sub still holds their messages.
            threads.shutdown(wait=False, cancel_futures=True)
        self.records.close()

    # -- intake ---------------------------------------------------------------

    def _guarded(self, subscription: str, callback):
        """`callback`, except that an exception it lets out dead-letters the message and acks it.

        The subscriber nacks a message whose callback raised, and the emulator hands it out again
        at once: a message that always fails would loop hot for ever, with nothing recorded.
        """

        def run(message) -> None:
            try:
                callback(message)
            except Exception as exc:
                log.exception("%s: message %s could not be handled; dead-lettered", subscription, message.message_id)
                self._dead_letter({
                    "subscription": subscription,
                    "message": {"data": base64.b64encode(message.data).decode(), "attributes": dict(message.attributes),
                                "messageId": message.message_id},
                    "error": f"{type(exc).__name__}: {exc}",
                }, subscription=subscription)
                message.ack()

        return run

    def _on_storage_notification(self, storage: list[Trigger]):
        """Deliver a GCS notification to each trigger on its bucket and event type.

        The message is acked once every trigger's delivery is recorded.
        """

        def callback(message) -> None:
            received = arrival(message)
            attrs = dict(message.attributes)
            event = storage_event(message.data, attrs, message.message_id, message.publish_time)
            targets = [t for t in storage if event and (t.bucket, t.event_type) == (attrs.get("bucketId"), event.type)]
            then = after_all(len(targets), message.ack)
            for trigger in targets:
                self._dispatch(trigger, event, received, then)

        return callback

    def _on_pubsub_message(self, trigger: Trigger, subscription: str):
        def callback(message) -> None:
            received = arrival(message)
            event = pubsub_event(
                self.settings.project, trigger.topic, subscription, message.data,
                dict(message.attributes), message.message_id, message.publish_time,
            )
            self._dispatch(trigger, event, received, message.ack)

        return callback

    def _on_stored_event(self, message) -> None:
        """A parked Firestore event or a replayed one: `{"trigger", "event"}`, the event as OutgoingEvent.to_json."""
        received = arrival(message)
        stored = json.loads(message.data)
        trigger = self.triggers.get(stored["trigger"])
        if trigger is None:
            message.ack()
            return
        self._dispatch(trigger, OutgoingEvent.from_json(stored["event"]), received, message.ack)

    def park_firestore_event(self, trigger_id: str, headers: dict[str, str], body: bytes) -> None:
        """Make the emulator's POST durable on Pub/Sub; only then may we answer 200."""
        location = self.settings.region
        event = firestore_event(self.settings.project, headers, body, location)
        data = json.dumps({"trigger": trigger_id, "event": event.to_json()}).encode()
        self.publisher.publish(self._topic(FIRESTORE_EVENTS_TOPIC), data).result(timeout=10)

    def _handler(self):
        router = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()

            def do_POST(self) -> None:
                # The emulator posts to /functions/projects/{project}/triggers/{trigger_id}.
                parts = self.path.strip("/").split("/")
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if len(parts) != 5 or parts[3] != "triggers" or parts[4] not in router.triggers:
                    self.send_response(404)
                    self.end_headers()
                    return
                try:
                    router.park_firestore_event(parts[4], dict(self.headers), body)
                    self.send_response(200)
                except Exception:
                    log.exception("could not park Firestore event for %s", parts[4])
                    self.send_response(500)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        return Handler

    # -- delivery -------------------------------------------------------------

    def _dispatch(self, trigger: Trigger, event: OutgoingEvent, received: dict, then: Callable[[], None]) -> None:
        """Deliver on the trigger's own threads; the subscriber's callback returns at once."""
        self._delivery_threads[trigger.name].submit(self.deliver, trigger, event, received, then).add_done_callback(log_crash)

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, url: str, event: OutgoingEvent) -> tuple[int | None, str | None]:
        """(status code, error); any exception is an error, since anything let out would be a hot loop (see _guarded)."""
        try:
            response = self._session().post(
                url, data=event.body, headers=wire_headers(event.headers), timeout=self.config.delivery_timeout_s
            )
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, response.text[:500] or response.reason

    def _dead_letter(self, payload: dict, **attributes: str) -> str | None:
        """Publish to the dead-letter topic; the error, if that failed."""
        try:
            topic = self._topic(self.settings.dead_letter_topic)
            self.publisher.publish(topic, json.dumps(payload).encode(), **attributes).result(timeout=10)
        except Exception as exc:
            log.exception("could not publish to the dead-letter topic")
            return f"{type(exc).__name__}: {exc}"
        return None

    def _record(self, trigger: Trigger, event: OutgoingEvent, status: str, attempt: int, stages: dict,
                code: int | None, error: str | None = None, then=lambda: None) -> None:
        doc = delivery_doc(trigger.name, trigger.function, event, status, attempt, utcnow(), code, error, stages)
        self.records.put(record_id(trigger.name, event.id), doc, then)

    def deliver(self, trigger: Trigger, event: OutgoingEvent, received: dict, then=lambda: None) -> None:
        """POST until a 2xx or the last attempt, then dead-letter; `then` (the ack) runs once that is recorded.

        Blocks its thread through the backoff, never through the record's write. Any failure
        to POST counts as a failed attempt, like a 5xx.
        """
        url = self.config.function_urls[trigger.function]
        retry = self.config.retry
        for attempt in range(1, retry.max_attempts + 1):
            posted_at = utcnow()
            code, error = self._post(url, event)
            stages = {**received, "posted_at": posted_at, "answered_at": utcnow()}
            if error is None:
                self._record(trigger, event, "delivered", attempt, stages, code, then=then)
                return
            log.warning("%s: %s attempt %d failed: %s %s", trigger.name, event.id, attempt, code, error)
            if attempt == retry.max_attempts or self._stop.is_set():
                break
            self._record(trigger, event, "retrying", attempt, stages, code, error)
            self._stop.wait(retry.backoff(attempt))
        unpublished = self._dead_letter({"trigger": trigger.name, "event": event.to_json(), "error": error}, trigger=trigger.name)
        if unpublished:
            # The record keeps the whole event: `fedpipe events replay` can still deliver it.
            error = f"{error}; not on the dead-letter topic: {unpublished}"
        self._record(trigger, event, "dead_lettered", attempt, stages, code, error, then=then)


def log_crash(delivery: Future) -> None:
    """A delivery that raised (deliver catches what it expects): its message stays unacked until its lease ends."""
    if not delivery.cancelled() and delivery.exception() is not None:
        log.error("delivery crashed", exc_info=delivery.exception())


def after_all(n: int, then: Callable[[], None]) -> Callable[[], None]:
    """A callable that runs `then` on its n-th call (at once when n is 0): one ack for n deliveries.

    Each delivery's `then` runs on the RecordWriter's one thread, so the count needs no lock.
    """
    remaining = [n]

    def one_done() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            then()

    if n == 0:
        then()
    return one_done


def arrival(message) -> dict:
    """When a message was published and when its callback began: the first two stages of a delivery record."""
    return {"published_at": message.publish_time, "received_at": utcnow()}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RouterConfig.model_validate_json(os.environ["FEDPIPE_ROUTER_CONFIG"])
    router = Router(config, Settings.from_env())
    router.start()
    log.info("router listening on 127.0.0.1:%d for %d triggers", config.port, len(router.triggers))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    router.stop()


if __name__ == "__main__":
    main()
