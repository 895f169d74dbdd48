"""Run one attempt of a training job: start it, heartbeat, train, report results.

The job's status is the contract with the rest of fedpipe, and the worker changes it
only through the node API: `running` with a fresh heartbeat while working, then
`completed` with results or `failed` with the error. If a heartbeat finds the attempt
is no longer current (reaped or cancelled), the worker stops without reporting more.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback

from google.cloud import storage

from shared import weights
from shared.config import Settings
from shared.envelope import Envelope
from shared.jobs import Job, JobStatus
from workers.trainer.attestation import AttestationFailed
from workers.trainer.data import load_dataset
from workers.trainer.federated import FederationEnded, run_federation
from workers.trainer.keys import node_keys
from workers.trainer.node_client import NodeClient
from workers.trainer.training import TrainConfig, Trainer

log = logging.getLogger("fedpipe.worker")


class AttemptLost(RuntimeError):
    """This attempt was reaped or cancelled; another attempt (or nobody) owns the job now."""


class Heartbeat:
    """Renews the job's lease every `interval_s` with the latest progress, in the background."""

    def __init__(self, api: NodeClient, job: Job, interval_s: float) -> None:
        self.api, self.job, self.interval_s = api, job, interval_s
        self.progress: dict[str, float] = {}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.api.heartbeat(self.job.id, self.job.attempt, dict(self.progress)):
                    self.lost.set()
                    return
            except Exception:  # a missed beat is fine; the lease has patience
                log.exception("heartbeat failed")


def run_job(job_id: str, attempt: int, settings: Settings, api: NodeClient, gcs: storage.Client, heartbeat_s: float) -> JobStatus | None:
    job = api.start(job_id, attempt)
    if job is None:
        log.warning("job %s attempt %d is not scheduled for this worker; exiting", job_id, attempt)
        return None
    log.info("job %s attempt %d running", job_id, attempt)
    started = time.monotonic()
    with Heartbeat(api, job, heartbeat_s) as beat:
        keys = node_keys(settings, job.spec.dataset.node, on_failure=lambda _: beat.lost.set())  # stop_job
        try:
            with keys:
                if job.spec.federation is not None:
                    results = run_federation(job, settings, api, gcs, keys.envelope, beat, AttemptLost)
                else:
                    results = train_and_evaluate(job, settings, api, gcs, keys.envelope, beat)
        except (AttestationFailed, AttemptLost) as exc:
            failure = exc if isinstance(exc, AttestationFailed) else keys.failure
            if failure is not None:  # the node's key was refused or withdrawn: no retry can fix the workload
                log.error("job %s attempt %d: attestation failed (%s); stopping", job_id, attempt, failure.reason)
                written = api.finish(job_id, attempt, "failed", error=f"attestation: {failure.reason}", reason="attestation")
                return JobStatus(written) if written else None
            log.warning("job %s attempt %d lost its lease; stopping", job_id, attempt)
            return None
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"
            # A federation node's error may be transient (a storage hiccup): the next attempt
            # picks up the current round, within the job's attempt limit.
            retry = job.spec.federation is not None and not isinstance(exc, FederationEnded)
            written = api.finish(job_id, attempt, "retry" if retry else "failed", error=error)
            return JobStatus(written) if written else None
    results["duration_s"] = round(time.monotonic() - started, 3)
    written = api.finish(job_id, attempt, "completed", results=results)
    log.info("job %s completed: %s", job_id, json.dumps(results))
    return JobStatus(written) if written else None


def train_and_evaluate(job: Job, settings: Settings, api: NodeClient, gcs: storage.Client, envelope: Envelope, beat: Heartbeat) -> dict:
    spec = job.spec.train
    split = load_dataset(api, gcs, envelope, job.id, spec.test_fraction, spec.seed)
    trainer = Trainer(TrainConfig.from_spec(spec), split.x_train.shape[1], split.n_classes)

    def on_epoch(epoch: int, metrics: dict) -> None:
        beat.progress = {"epoch": epoch + 1, "epochs": spec.epochs, **metrics}
        if beat.lost.is_set():
            raise AttemptLost(job.id)

    params, history = trainer.fit(trainer.init_params(), split.x_train, split.y_train, on_epoch=on_epoch)
    test = trainer.evaluate(params, split.x_test, split.y_test)
    prefix = f"models/{job.id}/attempt-{job.attempt}"
    bucket = gcs.bucket(settings.processed_bucket(job.spec.dataset.node))
    blob = bucket.blob(f"{prefix}/model.safetensors")
    blob.upload_from_string(weights.to_bytes(params, {"job": job.id, "model": spec.model}), content_type="application/octet-stream")
    metrics = {"test": test, "train_history": history, "devices": trainer.n_devices}
    bucket.blob(f"{prefix}/metrics.json").upload_from_string(json.dumps(metrics, indent=2), content_type="application/json")
    return {
        "accuracy": test["accuracy"],
        "loss": test["loss"],
        "test_examples": test["examples"],
        "train_examples": int(len(split.y_train)),
        "epochs": spec.epochs,
        "model_uri": f"gs://{bucket.name}/{prefix}/model.safetensors",
        "metrics_uri": f"gs://{bucket.name}/{prefix}/metrics.json",
    }
