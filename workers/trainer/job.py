"""Run one attempt of a training job: claim it, heartbeat, train, store results.

The job document is the contract with the rest of fedpipe: `running` with a fresh
heartbeat while working, then `completed` with results or `failed` with the error.
If the heartbeat finds the attempt is no longer current (reaped or cancelled), the
worker stops without writing anything more.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback

from google.cloud import firestore, storage

from shared import weights
from shared.config import Settings
from shared.jobs import Job, JobStatus, retry_or_fail, utcnow
from shared.jobstore import JobStore
from workers.trainer.data import load_dataset
from workers.trainer.federated import FederationEnded, run_federation
from workers.trainer.training import TrainConfig, Trainer

log = logging.getLogger("fedpipe.worker")


class AttemptLost(RuntimeError):
    """This attempt was reaped or cancelled; another attempt (or nobody) owns the job now."""


class Heartbeat:
    """Renews the job's lease every `interval_s` with the latest progress, in the background."""

    def __init__(self, store: JobStore, job: Job, interval_s: float) -> None:
        self.store, self.job, self.interval_s = store, job, interval_s
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
                if not self.store.heartbeat(self.job.id, self.job.attempt, utcnow(), dict(self.progress)):
                    self.lost.set()
                    return
            except Exception:  # a missed beat is fine; the lease has patience
                log.exception("heartbeat failed")


def run_job(job_id: str, attempt: int, settings: Settings, db: firestore.Client, gcs: storage.Client, heartbeat_s: float) -> JobStatus | None:
    store = JobStore(db, settings)
    job = store.start(job_id, attempt, utcnow())
    if job is None:
        log.warning("job %s attempt %d is not scheduled for this worker; exiting", job_id, attempt)
        return None
    log.info("job %s attempt %d running", job_id, attempt)
    started = time.monotonic()
    with Heartbeat(store, job, heartbeat_s) as beat:
        try:
            if job.spec.federation is not None:
                results = run_federation(job, settings, db, gcs, beat, AttemptLost)
            else:
                results = train_and_evaluate(job, settings, db, gcs, beat)
        except AttemptLost:
            log.warning("job %s attempt %d lost its lease; stopping", job_id, attempt)
            return None
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"
            if job.spec.federation is not None and not isinstance(exc, FederationEnded):
                # A federation node's error may be transient (a storage or Firestore hiccup): the
                # next attempt picks up the current round, within the job's attempt limit.
                written = store.update(job_id, lambda j: retry_or_fail(j, utcnow(), error) if j.attempt == attempt and not j.is_terminal else None)
                return written.status if written else None
            written = store.finish(job_id, attempt, utcnow(), JobStatus.FAILED, reason="worker error", error=error)
            return JobStatus.FAILED if written else None
    results["duration_s"] = round(time.monotonic() - started, 3)
    written = store.finish(job_id, attempt, utcnow(), JobStatus.COMPLETED, results=results)
    log.info("job %s completed: %s", job_id, json.dumps(results))
    return JobStatus.COMPLETED if written else None


def train_and_evaluate(job: Job, settings: Settings, db: firestore.Client, gcs: storage.Client, beat: Heartbeat) -> dict:
    spec = job.spec.train
    split = load_dataset(db, gcs, settings, job.spec.dataset, spec.test_fraction, spec.seed)
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
