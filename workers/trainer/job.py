"""Run one attempt of a training job: start it, heartbeat, train, report results.

The job's status is the contract with the rest of fedpipe, and the worker changes it
only through the node API: `running` with a fresh heartbeat while working, then
`completed` with results or `failed` with the error. If a heartbeat finds the attempt
is no longer current (reaped or cancelled), the worker stops without reporting more.

A single job resumes from its latest checkpoint (workers/trainer/checkpoints.py), so a
new attempt after a lost one does only the epochs that were not saved. In a multi-host
run (workers/trainer/distributed.py) every process trains, and only the leader speaks
for the run: it starts the attempt, heartbeats, writes checkpoints and the model and
reports; the others learn the job, its data set and the checkpoint from it, and stop
when it stops.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback

import jax
from google.cloud import storage

from shared import weights
from shared.config import Settings
from shared.dataset_shards import DatasetShards
from shared.jobs import Job, JobStatus
from workers.trainer import checkpoints
from workers.trainer.attestation import AttestationFailed
from workers.trainer.data import read_split
from workers.trainer.distributed import Group
from workers.trainer.federated import FederationEnded, run_federation
from workers.trainer.keys import NodeKeys, node_keys
from workers.trainer.node_client import NodeClient
from workers.trainer.training import TrainConfig, Trainer, TrainState

log = logging.getLogger("fedpipe.worker")

# An epoch's verdict, the worst any process of the run saw: go on, stop quietly (the lease is
# lost: another attempt owns the job), or stop and fail the job (a node key was withdrawn).
GO_ON, LEASE_LOST, ATTESTATION_FAILED = 0, 1, 2


class AttemptLost(RuntimeError):
    """This attempt was reaped or cancelled, or a process of its run failed attestation (`attestation`)."""

    def __init__(self, job_id: str, attestation: bool = False) -> None:
        super().__init__(job_id)
        self.attestation = attestation


class Heartbeat:
    """Renews the job's lease every `interval_s` with the latest progress, in the background.

    Without an `api` (a multi-host run's other processes) it only holds the local stop flag.
    """

    def __init__(self, api: NodeClient | None, job: Job, interval_s: float) -> None:
        self.api, self.job, self.interval_s = api, job, interval_s
        self.progress: dict[str, float] = {}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def __enter__(self) -> Heartbeat:
        if self.api is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.api.heartbeat(self.job.id, self.job.attempt, dict(self.progress)):
                    self.lost.set()
                    return
            except Exception:  # a missed beat is fine; the lease has patience
                log.exception("heartbeat failed")


def run_job(job_id: str, attempt: int, settings: Settings, api: NodeClient | None, gcs: storage.Client, heartbeat_s: float,
            group: Group = Group()) -> JobStatus | None:
    """Run this process's part of the attempt. The leader (`api` set) returns the job's status as written;
    another process of a multi-host run returns COMPLETED when its part ran to the end, else None."""
    job = start_attempt(job_id, attempt, api, group)
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
                    results = train_and_evaluate(job, settings, api, gcs, keys, beat, group)
        except (AttestationFailed, AttemptLost) as exc:
            failure = _attestation_failure(exc, keys)
            if failure is not None:  # the node's key was refused or withdrawn: no retry can fix the workload
                log.error("job %s attempt %d: attestation failed (%s); stopping", job_id, attempt, failure)
                written = api.finish(job_id, attempt, "failed", error=f"attestation: {failure}", reason="attestation") if api else None
                return JobStatus(written) if written else None
            log.warning("job %s attempt %d lost its lease; stopping", job_id, attempt)
            return None
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            if api is None:
                return None
            error = f"{type(exc).__name__}: {exc}"
            # A federation node's error may be transient (a storage hiccup), and so may a multi-host run's
            # failed collective (a host lost): the next attempt picks up where this one left, within the
            # job's attempt limit.
            retry = (job.spec.federation is not None and not isinstance(exc, FederationEnded)) or (
                group.size > 1 and isinstance(exc, jax.errors.JaxRuntimeError)
            )
            written = api.finish(job_id, attempt, "retry" if retry else "failed", error=error)
            return JobStatus(written) if written else None
    if api is None:
        return JobStatus.COMPLETED
    results["duration_s"] = round(time.monotonic() - started, 3)
    written = api.finish(job_id, attempt, "completed", results=results)
    log.info("job %s completed: %s", job_id, json.dumps(results))
    return JobStatus(written) if written else None


def start_attempt(job_id: str, attempt: int, api: NodeClient | None, group: Group) -> Job | None:
    """The leader starts the attempt; every process of the run gets the job from it (None: not ours to run)."""
    payload = None
    if api is not None:
        job = api.start(job_id, attempt)
        payload = job.model_dump_json().encode() if job is not None else b""
    shared = group.share(payload)
    return Job.model_validate_json(shared) if shared else None


def _attestation_failure(exc: Exception, keys: NodeKeys) -> str | None:
    """Why the attempt must fail for attestation, or None when it only lost its lease."""
    if isinstance(exc, AttestationFailed):
        return exc.reason
    if keys.failure is not None:
        return keys.failure.reason
    return "another host of this run failed attestation" if isinstance(exc, AttemptLost) and exc.attestation else None


def starting_state(trainer: Trainer, store: checkpoints.CheckpointStore, fingerprint: str, group: Group, leader: bool) -> TrainState:
    """Epoch 0, or the latest checkpoint that fits as the leader found it: every process starts from the same bits."""
    fresh = trainer.start(trainer.init_params())
    found = group.share((checkpoints.latest(store, fresh, fingerprint) or b"") if leader else None)
    return checkpoints.decode(found, fresh, fingerprint) if found else fresh


def train_and_evaluate(job: Job, settings: Settings, api: NodeClient | None, gcs: storage.Client, keys: NodeKeys, beat: Heartbeat,
                       group: Group) -> dict:
    """Train the job (from its latest checkpoint, if any) and evaluate; the leader writes the model and returns the results."""
    spec = job.spec.train
    leader = api is not None
    dataset = DatasetShards.model_validate_json(group.share(api.dataset(job.id).model_dump_json().encode() if leader else None))
    split = read_split(gcs, keys.envelope, dataset, spec.test_fraction, spec.seed)
    trainer = Trainer(TrainConfig.from_spec(spec), split.x_train.shape[1], split.n_classes)
    bucket = gcs.bucket(settings.processed_bucket(job.spec.dataset.node))
    store = checkpoints.CheckpointStore(bucket, keys.envelope, job.id)
    fingerprint = checkpoints.job_fingerprint(job.id, trainer, len(split.y_train))
    state = starting_state(trainer, store, fingerprint, group, leader)
    resumed = {"resumed_from_step": state.step} if state.step else {}
    if resumed:
        log.info("job %s attempt %d resumes from step %d (epoch %d of %d)", job.id, job.attempt, state.step, state.epoch, spec.epochs)

    def on_epoch(epoch: int, metrics: dict) -> None:
        beat.progress = {"epoch": epoch + 1, "epochs": spec.epochs, **resumed, **metrics}
        local = ATTESTATION_FAILED if keys.failure is not None else LEASE_LOST if beat.lost.is_set() else GO_ON
        verdict = group.verdict(local)  # every process stops after the same epoch
        if verdict != GO_ON:
            raise AttemptLost(job.id, attestation=verdict == ATTESTATION_FAILED)

    saver = checkpoints.Checkpointer(store, spec.epochs, fingerprint) if leader else None
    state = trainer.train(state, split.x_train, split.y_train, on_epoch=on_epoch, on_state=saver)
    test = trainer.evaluate(state.params, split.x_test, split.y_test)  # a collective too: every process takes part
    if saver is None:
        return {}
    prefix = f"models/{job.id}/attempt-{job.attempt}"
    blob = bucket.blob(f"{prefix}/model.safetensors")
    blob.upload_from_string(weights.to_bytes(state.params, {"job": job.id, "model": spec.model}), content_type="application/octet-stream")
    metrics = {"test": test, "train_history": list(state.history), "devices": trainer.n_devices, "hosts": group.size}
    bucket.blob(f"{prefix}/metrics.json").upload_from_string(json.dumps(metrics, indent=2), content_type="application/json")
    return {
        "accuracy": test["accuracy"],
        "loss": test["loss"],
        "test_examples": test["examples"],
        "train_examples": int(len(split.y_train)),
        "epochs": spec.epochs,
        "hosts": group.size,
        "checkpoints": len(saver.written),
        **resumed,
        "model_uri": f"gs://{bucket.name}/{prefix}/model.safetensors",
        "metrics_uri": f"gs://{bucket.name}/{prefix}/metrics.json",
    }
