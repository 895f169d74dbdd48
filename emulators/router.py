"""The trigger router: local Eventarc, driven by the trigger declaration in shared/triggers.py.

Storage triggers read fake-gcs-server's notification topic, Pub/Sub triggers get a
subscription each, and Firestore triggers are registered with the emulator, whose
fire-and-forget POSTs are parked on an internal topic before they are acknowledged,
so no event is lost while a function is down. Every event is then POSTed as a
binary-mode CloudEvent; a non-2xx answer is retried with exponential backoff and,
after the last attempt, dead-lettered. Run as `python -m emulators.router`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from google.api_core.exceptions import AlreadyExists
from google.cloud import firestore, pubsub_v1

from emulators.deliveries import DeliveryLog
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
)
from emulators.reaper import run_reaper
from emulators.router_config import RouterConfig
from shared.config import Settings
from shared.jobs import utcnow
from shared.triggers import Trigger, triggers

log = logging.getLogger("fedpipe.router")


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
        self.deliveries = DeliveryLog(firestore.Client(project=settings.project))
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
        flow = pubsub_v1.types.FlowControl(max_messages=64)
        self._futures.append(self.subscriber.subscribe(path, callback, flow_control=flow))

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
        for trigger in self.triggers.values():
            subscription = f"eventarc-{trigger.name}"
            if trigger.kind == "storage":
                self._subscribe(subscription, GCS_NOTIFICATIONS_TOPIC, self._on_storage_notification(trigger))
            elif trigger.kind == "pubsub":
                self._subscribe(subscription, trigger.topic, self._on_pubsub_message(trigger, subscription))
            else:
                self._subscribe(subscription, FIRESTORE_EVENTS_TOPIC, self._on_parked_firestore_event(trigger))
                self._register_firestore_trigger(trigger)
        self._subscribe("eventarc-replay", REPLAY_TOPIC, self._on_replay)
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

    # -- intake ---------------------------------------------------------------

    def _on_storage_notification(self, trigger: Trigger):
        def callback(message) -> None:
            attrs = dict(message.attributes)
            if attrs.get("bucketId") != trigger.bucket:
                message.ack()
                return
            event = storage_event(message.data, attrs, message.message_id, message.publish_time)
            if event is None or event.type != trigger.event_type:
                message.ack()
                return
            self.deliver(trigger, event)
            message.ack()

        return callback

    def _on_pubsub_message(self, trigger: Trigger, subscription: str):
        def callback(message) -> None:
            event = pubsub_event(
                self.settings.project, trigger.topic, subscription, message.data,
                dict(message.attributes), message.message_id, message.publish_time,
            )
            self.deliver(trigger, event)
            message.ack()

        return callback

    def _on_parked_firestore_event(self, trigger: Trigger):
        def callback(message) -> None:
            parked = json.loads(message.data)
            if parked["trigger"] == trigger.name:
                self.deliver(trigger, OutgoingEvent.from_json(parked["event"]))
            message.ack()

        return callback

    def _on_replay(self, message) -> None:
        request = json.loads(message.data)
        trigger = self.triggers.get(request["trigger"])
        if trigger is not None:
            self.deliver(trigger, OutgoingEvent.from_json(request["event"]))
        message.ack()

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

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, url: str, event: OutgoingEvent) -> tuple[int | None, str | None]:
        try:
            response = self._session().post(url, data=event.body, headers=event.headers, timeout=self.config.delivery_timeout_s)
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, response.text[:500] or response.reason

    def deliver(self, trigger: Trigger, event: OutgoingEvent) -> None:
        """POST until a 2xx or the last attempt; then dead-letter. Blocks this callback thread."""
        url = self.config.function_urls[trigger.function]
        retry = self.config.retry
        for attempt in range(1, retry.max_attempts + 1):
            code, error = self._post(url, event)
            if error is None:
                self.deliveries.record(trigger.name, trigger.function, event, "delivered", attempt, utcnow(), code)
                return
            log.warning("%s: %s attempt %d failed: %s %s", trigger.name, event.id, attempt, code, error)
            if attempt == retry.max_attempts or self._stop.is_set():
                break
            self.deliveries.record(trigger.name, trigger.function, event, "retrying", attempt, utcnow(), code, error)
            time.sleep(retry.backoff(attempt))
        dead = json.dumps({"trigger": trigger.name, "event": event.to_json(), "error": error}).encode()
        self.publisher.publish(self._topic(self.settings.dead_letter_topic), dead, trigger=trigger.name).result(timeout=10)
        self.deliveries.record(trigger.name, trigger.function, event, "dead_lettered", attempt, utcnow(), code, error)


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
