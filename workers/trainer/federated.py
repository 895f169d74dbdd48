"""A node's worker in a federation: launched once, it trains every round without restarting.

It follows the hub's rounds through the node API: a long poll answers as soon as the
federation moves past the round the worker last finished. Each round it evaluates the
global model it received on its own held-out split, trains from it on its own shards
only, uploads the weights with its example count to its own prefix of the hub bucket,
and reports the upload, which the hub then verifies and counts. The Trainer is built
once, so rounds after the first reuse the compiled step. A relaunched worker picks up
whatever round is current, and skips a round the hub already counted for its node.
"""

from __future__ import annotations

import json
import logging
import math
import time

from google.cloud import storage

from shared import signing, weights
from shared.config import Settings
from shared.envelope import Envelope
from shared.federation import update_object
from shared.io_pool import IO
from shared.jobs import Job
from workers.trainer.data import load_dataset
from workers.trainer.node_client import FederationView, NodeClient
from workers.trainer.signing_key import node_signer
from workers.trainer.training import TrainConfig, Trainer
from workers.trainer.update_seal import seal_upload

log = logging.getLogger("fedpipe.worker.federated")
WAIT_S = 10.0  # one long poll; the heartbeat's verdict is checked between polls


class TrainingDiverged(RuntimeError):
    """Local training produced non-finite metrics: an update like that would poison the global model."""


class FederationEnded(RuntimeError):
    """The federation failed or was rejected: this node's job ends with it (no retry)."""


def run_federation(job: Job, settings: Settings, api: NodeClient, gcs: storage.Client, envelope: Envelope, beat, lost_error: type[Exception]) -> dict:
    """Train every round of the job's federation; returns the final results once it completes."""
    ref = job.spec.federation
    spec = job.spec.train
    view = api.federation(ref.id)
    split = load_dataset(api, gcs, envelope, job.id, spec.test_fraction, spec.seed, view.stats)
    trainer = Trainer(TrainConfig.from_spec(spec), split.x_train.shape[1], split.n_classes)
    initial = trainer.init_params()  # same seed on every node: round 1 starts from the same model
    expected = weights.spec_of(initial)
    hub = gcs.bucket(settings.hub_bucket)
    signer = node_signer(settings.project, ref.node)
    if view.signed_updates and signer is None:  # every update would be refused: say why now, not at the deadline
        raise FederationEnded(f"federation {ref.id} takes signed updates only, and node {ref.node} has no signing key "
                              f"({signing.ENV_VAR}, or its key released by the key broker)")
    done = 0  # the last round this worker finished
    while True:
        if beat.lost.is_set():
            raise lost_error(job.id)
        if view.status != "running":
            if view.status == "completed":
                return {"federation": ref.id, "rounds": view.rounds, **(view.final or {})}
            raise FederationEnded(f"federation {ref.id} {view.status}: {view.error}")
        r = view.round
        if r is not None and r > done:
            if not view.counted:  # only a relaunched worker finds its update counted already
                global_params = initial if view.global_model_round is None else load_global(api, ref.id, view.global_model_round, expected)
                train_round(job, view, r, global_params, trainer, split, hub, api, envelope, beat, lost_error, signer)
            done = r
        view = api.federation(ref.id, after=done, wait_s=WAIT_S)


def load_global(api: NodeClient, fid: str, r: int, expected: dict) -> dict:
    """The hub's global model after round r, refused unless it has exactly this model's tensors."""
    return weights.from_bytes(api.global_model(fid, r), expected=expected)[0]


def train_round(job, view: FederationView, r: int, global_params, trainer, split, hub, api: NodeClient, envelope: Envelope, beat,
                lost_error, signer: signing.Signer | None) -> None:
    ref = job.spec.federation
    started = time.perf_counter()
    evaluated = trainer.evaluate(global_params, split.x_test, split.y_test)
    metrics = {"global_accuracy": evaluated["accuracy"], "global_loss": evaluated["loss"], "test_examples": evaluated["examples"]}
    evaluate_only = view.kind == "evaluate"
    if evaluate_only:
        payload = json.dumps(metrics).encode()
    else:
        def on_epoch(epoch: int, m: dict) -> None:
            beat.progress = {"round": r, "rounds": view.rounds, "epoch": epoch + 1, "epochs": view.train.epochs, **m}
            if beat.lost.is_set():
                raise lost_error(job.id)

        params, history = trainer.fit(global_params, split.x_train, split.y_train, on_epoch=on_epoch, global_params=global_params)
        metrics |= {"train_loss": history[-1]["loss"], "train_accuracy": history[-1]["accuracy"]}
        payload = weights.to_bytes(params, {"federation": ref.id, "round": str(r), "node": ref.node})
    metrics["compute_s"] = round(time.perf_counter() - started, 4)  # evaluate + train: what is not overhead
    if diverged := {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}:
        raise TrainingDiverged(f"federation {ref.id} round {r} on {ref.node}: {diverged}; no update uploaded")
    blob = hub.blob(update_object(ref.id, r, ref.node, job.attempt, evaluate_only))
    examples = len(split.y_train)
    blob.metadata = {"examples": str(examples), "metrics": json.dumps(metrics)}
    # Sealed under the node's key for the hub, or to the attested aggregator (the signature covers what is inside).
    # Sealing and signing each take an attested release of a key: they go out together.
    sealing = IO.submit(seal_upload, view, hub.client.project, envelope, payload, hub.name, blob.name, refetch=lambda: api.federation(ref.id))
    if signer is not None:  # the hub admits only updates signed with this node's registered key
        claims = signing.update_claims(
            federation=ref.id, round=r, node=ref.node, attempt=job.attempt, examples=examples, metrics=metrics, payload=payload
        )
        blob.metadata |= signing.signature_metadata(signer, claims)
    blob.upload_from_string(sealing.result(), content_type="application/octet-stream")
    reply = api.report_update(ref.id, r, blob.name, blob.generation)
    what = "evaluation" if evaluate_only else "update"
    if reply.counted:
        log.info("federation %s round %d: %s counted (%s): %s", ref.id, r, what, metrics, reply.message)
    else:  # the round goes on without it; the next round's model comes as usual
        log.error("federation %s round %d: %s not counted: %s", ref.id, r, what, reply.message)
