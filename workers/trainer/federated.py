"""A node's worker in a federation: launched once, it trains every round without restarting.

It follows the hub's rounds through the federation document, woken by the round
broadcasts on Pub/Sub or by a listener on that document (and, should both miss, by a
short poll). Each
round it evaluates the global model it received on its own held-out split, trains
from it on its own shards only, and uploads the weights with its example count to
the hub. The Trainer is built once, so rounds after the first reuse the compiled
step. A relaunched worker picks up whatever round is current.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time

from google.api_core.exceptions import AlreadyExists
from google.cloud import firestore, pubsub_v1, storage

from shared import gcs_uri, signing, weights
from shared.config import Settings
from shared.datasets import FeatureStats
from shared.federation import FederationConfig, member_id, round_key, round_kind, update_object
from shared.io_pool import parallel
from shared.jobs import Job
from workers.trainer.data import load_dataset
from workers.trainer.training import TrainConfig, Trainer

log = logging.getLogger("fedpipe.worker.federated")
POLL_S = 2.0  # fallback should both signals miss: the federation document is the truth


class RoundSignals:
    """Wakes the worker when its federation moves: the hub's round broadcast on Pub/Sub, or
    the federation document changing (a Firestore listener), whichever comes first.

    The listener also hands over the document it saw, which saves a read per round, and
    it keeps the worker going should a broadcast be lost.
    """

    def __init__(self, settings: Settings, fed_ref: firestore.DocumentReference, fid: str, node: str) -> None:
        self.fid = fid
        self.subscriber = pubsub_v1.SubscriberClient()
        path = self.subscriber.subscription_path(settings.project, member_id(fid, node))
        try:
            topic = self.subscriber.topic_path(settings.project, settings.fed_rounds_topic)
            self.subscriber.create_subscription(name=path, topic=topic, ack_deadline_seconds=30)
        except AlreadyExists:
            pass
        self.path = path
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict | None = None
        self._announced = 0  # the latest round a broadcast announced
        self._future = self.subscriber.subscribe(path, self._on_message)
        self._watch = fed_ref.on_snapshot(self._on_snapshot)

    def _on_message(self, message) -> None:
        message.ack()
        if message.attributes.get("federation") == self.fid:
            with self._lock:
                self._announced = max(self._announced, int(message.attributes.get("round", 0)))
            self._wake.set()

    def _on_snapshot(self, snapshots, _changes, _read_time) -> None:
        if snapshots and snapshots[0].exists:
            with self._lock:
                self._seen = snapshots[0].to_dict()
            self._wake.set()

    def wait(self, timeout_s: float, past_round: int) -> dict | None:
        """Block until the federation moves beyond `past_round` (or `timeout_s` passes).

        Returns the federation document the listener saw, or None when only a broadcast
        (or the timeout) says so: then the caller reads the document itself.
        """
        deadline = time.monotonic() + timeout_s
        while self._wake.wait(max(0.0, deadline - time.monotonic())):
            self._wake.clear()
            with self._lock:
                seen, self._seen = self._seen, None
                announced = self._announced
            if seen is not None:
                return seen
            if announced > past_round:
                return None
        return None

    def close(self, delete: bool) -> None:
        """Stop listening; `delete` the subscription once the federation is over (not on a crash:
        a relaunched worker reuses it)."""
        self._watch.unsubscribe()
        self._future.cancel()
        if delete:
            try:
                self.subscriber.delete_subscription(subscription=self.path)
            except Exception:  # it expires by itself after 31 idle days
                log.warning("could not delete subscription %s", self.path, exc_info=True)
        self.subscriber.close()


class TrainingDiverged(RuntimeError):
    """Local training produced non-finite metrics: an update like that would poison the global model."""


class FederationEnded(RuntimeError):
    """The federation failed or was rejected: this node's job ends with it (no retry)."""


def run_federation(job: Job, settings: Settings, db: firestore.Client, gcs: storage.Client, beat, lost_error: type[Exception]) -> dict:
    """Train every round of the job's federation; returns the final results once it completes."""
    ref = job.spec.federation
    fed_ref = db.collection(settings.federations_collection).document(ref.id)
    fed = fed_ref.get().to_dict()
    config = FederationConfig.model_validate(fed["config"])
    spec = job.spec.train
    split = load_dataset(db, gcs, settings, job.spec.dataset, spec.test_fraction, spec.seed, FeatureStats.model_validate(fed["stats"]))
    trainer = Trainer(TrainConfig.from_spec(spec), split.x_train.shape[1], split.n_classes)
    initial = trainer.init_params()  # same seed on every node: round 1 starts from the same model
    expected = weights.spec_of(initial)
    hub = gcs.bucket(settings.hub_bucket)
    signer = signing.signer_from_env(os.environ)
    if config.signed_updates and signer is None:  # every update would be refused: say why now, not at the deadline
        raise FederationEnded(f"federation {ref.id} takes signed updates only, and {signing.ENV_VAR} names no key for node {ref.node}")
    signals = RoundSignals(settings, fed_ref, ref.id, ref.node)
    done: set[int] = set()
    over = False
    seen: dict | None = None
    try:
        while True:
            if beat.lost.is_set():
                raise lost_error(job.id)
            fed = seen or fed_ref.get().to_dict()
            if fed["status"] != "running":
                over = True
                if fed["status"] == "completed":
                    return {"federation": ref.id, "rounds": config.rounds, **fed["final"], "global_model_uri": fed["global_model_uri"]}
                raise FederationEnded(f"federation {ref.id} {fed['status']}: {fed.get('error')}")
            r = fed["round"]
            if r in done:
                seen = signals.wait(POLL_S, past_round=r)
                continue
            # A round the federation document names is open: the hub closes it and opens the
            # next in one write. Only a relaunched worker may have reported it already.
            global_params, mine = parallel(
                lambda uri=fed["global_model_uri"]: load_global(gcs, uri, expected) if uri else initial,
                lambda key=round_key(r): None if done else fed_ref.collection("rounds").document(key).collection("updates").document(ref.node).get(),
            )
            if mine is None or not mine.exists:
                train_round(job, config, r, global_params, trainer, split, hub, beat, lost_error, signer)
            done.add(r)
            seen = signals.wait(POLL_S, past_round=r)
    finally:
        signals.close(delete=over)


def load_global(gcs: storage.Client, uri: str, expected: dict) -> dict:
    """The hub's global model, refused unless it has exactly this model's tensors."""
    return weights.from_bytes(gcs_uri.read(gcs, uri), expected=expected)[0]


def train_round(job, config, r: int, global_params, trainer, split, hub, beat, lost_error, signer: signing.Signer | None) -> None:
    ref = job.spec.federation
    started = time.perf_counter()
    evaluated = trainer.evaluate(global_params, split.x_test, split.y_test)
    metrics = {"global_accuracy": evaluated["accuracy"], "global_loss": evaluated["loss"], "test_examples": evaluated["examples"]}
    evaluate_only = round_kind(config, r) == "evaluate"
    if evaluate_only:
        payload, content_type = json.dumps(metrics).encode(), "application/json"
    else:
        def on_epoch(epoch: int, m: dict) -> None:
            beat.progress = {"round": r, "rounds": config.rounds, "epoch": epoch + 1, "epochs": config.local_epochs, **m}
            if beat.lost.is_set():
                raise lost_error(job.id)

        params, history = trainer.fit(global_params, split.x_train, split.y_train, on_epoch=on_epoch, global_params=global_params)
        metrics |= {"train_loss": history[-1]["loss"], "train_accuracy": history[-1]["accuracy"]}
        payload = weights.to_bytes(params, {"federation": ref.id, "round": str(r), "node": ref.node})
        content_type = "application/octet-stream"
    metrics["compute_s"] = round(time.perf_counter() - started, 4)  # evaluate + train: what is not overhead
    if diverged := {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}:
        raise TrainingDiverged(f"federation {ref.id} round {r} on {ref.node}: {diverged}; no update uploaded")
    blob = hub.blob(update_object(ref.id, r, ref.node, job.attempt, evaluate_only))
    examples = len(split.y_train)
    blob.metadata = {"examples": str(examples), "metrics": json.dumps(metrics)}
    if signer is not None:  # the hub admits only updates signed with this node's registered key
        claims = signing.update_claims(
            federation=ref.id, round=r, node=ref.node, attempt=job.attempt, examples=examples, metrics=metrics, payload=payload
        )
        blob.metadata |= signing.signature_metadata(signer, claims)
    blob.upload_from_string(payload, content_type=content_type)
    log.info("federation %s round %d: %s uploaded (%s)", ref.id, r, "evaluation" if evaluate_only else "update", metrics)
