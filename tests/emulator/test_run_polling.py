"""Following runs on their engines, against Firestore: the job store's steps in real transactions.

The jobs live in a collection of their own, so neither the stack's job trigger nor its
clock touches them: each test drives `follow` and `launch_pending_job` itself, with a
recording launcher and its own `now`.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, transition, utcnow
from shared.jobstore import JobStore
from shared.launch import launch_pending_job
from shared.launchers import LaunchRefused, RunState
from shared.timekeeper import follow
from tests.unit.queue_fakes import RecordingLauncher

pytestmark = pytest.mark.emulator

S = JobStatus
SPEC = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=1, lease_seconds=60)


@pytest.fixture
def store(clients) -> JobStore:
    return JobStore(clients.db, clients.settings.model_copy(update={"jobs_collection": f"run-polling-{uuid.uuid4().hex[:8]}"}))


def put(store: JobStore, job_id: str, *, running: bool, at) -> Job:
    job = transition(Job.new(job_id, SPEC, at), S.SCHEDULED, at, execution=f"fake:{job_id}/1")
    if running:
        job = transition(job, S.RUNNING, at, heartbeat_at=at)
    assert store.create(job)
    return job


def test_the_clock_acts_on_engine_states_in_firestore_transactions(store):
    start = utcnow()
    put(store, "ended", running=True, at=start)
    put(store, "queued", running=False, at=start)
    put(store, "silent", running=True, at=start)
    put(store, "alive", running=True, at=start + timedelta(minutes=10))
    done = transition(put(store, "done", running=True, at=start), S.COMPLETED, start)
    store.update("done", lambda j: done)
    launcher = RecordingLauncher({
        "fake:ended/1": RunState.FAILED, "fake:queued/1": RunState.QUEUED, "fake:silent/1": RunState.RUNNING, "fake:alive/1": RunState.RUNNING,
    })
    now = start + timedelta(minutes=10, seconds=30)  # every lease but alive's has run out

    assert sorted(j.id for j in store.active()) == ["alive", "ended", "queued", "silent"]
    followed = follow(store, launcher, now)

    assert {p.job_id: p.action for p in followed.polled} == {"ended": "lost", "queued": "waiting", "silent": "none", "alive": "none"}
    ended = store.get("ended")
    assert (ended.status, ended.error) == (S.FAILED, "the engine reports its run failed (fake:ended/1) (attempt 1 of 1)")
    queued = store.get("queued")
    assert (queued.status, queued.heartbeat_at) == (S.SCHEDULED, now)
    assert [(r.job.id, r.job.status) for r in followed.reaped] == [("silent", S.FAILED)]
    assert "no heartbeat for 60s" in store.get("silent").error
    assert launcher.stopped == ["fake:silent/1"]
    assert store.get("alive").status is S.RUNNING and store.get("done").status is S.COMPLETED

    again = follow(store, launcher, now)  # the same tick twice: nothing more is lost, reaped or stopped
    assert {p.job_id: p.action for p in again.polled} == {"queued": "waiting", "alive": "none"}
    assert again.reaped == [] and launcher.stopped == ["fake:silent/1"]


def test_a_refused_launch_fails_the_job_at_once_in_firestore(store):
    job = Job.new("tpu-on-cloud-run", JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=3), utcnow())
    assert store.create(job)
    refusal = "job tpu-on-cloud-run: Cloud Run Jobs runs cpu or gpu:nvidia-l4:1 on one host"
    launch_pending_job(store, RecordingLauncher(launch_error=LaunchRefused(refusal)), job.id, utcnow())
    failed = store.get(job.id)
    assert (failed.status, failed.attempt, failed.error) == (S.FAILED, 1, refusal)
