"""shared.launch: one launch per attempt, refusals fail at once, and runs the queue no longer wants are stopped."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, transition
from shared.launch import Stopped, cancelled_execution, launch_pending_job, stop_run
from shared.launchers import LaunchError, LaunchRefused
from tests.unit.queue_fakes import LaunchOnly, MemoryJobStore, RecordingLauncher

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
S = JobStatus


def pending(job_id: str = "j", max_attempts: int = 3) -> Job:
    return Job.new(job_id, JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=max_attempts), NOW)


def test_a_launch_records_its_execution_and_a_duplicate_event_launches_nothing():
    store, launcher = MemoryJobStore([pending()]), RecordingLauncher()
    assert launch_pending_job(store, launcher, "j", NOW) == "attempt 1 launched: fake:j/1"
    assert launch_pending_job(store, launcher, "j", NOW) == "not pending (already claimed, or gone): nothing to launch"
    assert launcher.launched == [("j", 1)]
    assert (store.docs["j"].status, store.docs["j"].execution) == (S.SCHEDULED, "fake:j/1")


def test_a_refused_launch_fails_the_job_at_once_with_the_refusal_as_its_error():
    store = MemoryJobStore([pending(max_attempts=3)])
    refusal = "job j: tpu:v5e:2x4 cannot run on Cloud Run Jobs, which runs cpu or gpu:nvidia-l4:1 on one host"
    outcome = launch_pending_job(store, RecordingLauncher(launch_error=LaunchRefused(refusal)), "j", NOW)
    job = store.docs["j"]
    assert (job.status, job.attempt, job.error) == (S.FAILED, 1, refusal)  # attempts were left: none is used
    assert job.history[-1].reason == refusal
    assert outcome == f"attempt 1 refused ({refusal}); job now failed"


def test_a_failed_launch_is_retried_while_attempts_remain():
    store = MemoryJobStore([pending(max_attempts=2)])
    launch_pending_job(store, RecordingLauncher(launch_error=LaunchError("quota exceeded")), "j", NOW)
    job = store.docs["j"]
    assert (job.status, job.attempt, job.history[-1].reason) == (S.PENDING, 2, "launch failed: quota exceeded")


def test_a_run_launched_for_a_job_cancelled_meanwhile_is_stopped():
    store = MemoryJobStore([pending()])

    class CancelledWhileLaunching(RecordingLauncher):
        def launch(self, job):
            store.docs["j"] = transition(store.docs["j"], S.CANCELLED, NOW)  # the user's cancel lands first
            return super().launch(job)

    launcher = CancelledWhileLaunching()
    outcome = launch_pending_job(store, launcher, "j", NOW)
    assert launcher.stopped == ["fake:j/1"]
    assert store.docs["j"].execution is None  # a cancelled job never names a run it did not know of
    assert outcome == "attempt 1 launched as fake:j/1, but the job moved on meanwhile: stopped fake:j/1"


def test_stop_run_outcomes():
    assert stop_run(RecordingLauncher(), "x") == Stopped("x", "stopped")
    assert stop_run(RecordingLauncher(stop_error=LaunchError("denied")), "x") == Stopped("x", "failed", "denied")
    assert stop_run(LaunchOnly(), "x") == Stopped("x", "unsupported", "LaunchOnly cannot stop runs")
    assert str(Stopped("x", "failed", "denied")) == "could not stop x: denied"


@pytest.mark.parametrize(
    ("before", "after", "execution"),
    [
        ({"status": "running", "execution": "e1"}, {"status": "cancelled", "execution": "e1"}, "e1"),
        ({"status": "scheduled", "execution": "e1"}, {"status": "cancelled", "execution": "e1"}, "e1"),
        (None, {"status": "cancelled", "execution": "e1"}, "e1"),  # created cancelled (an import): still stopped
        ({"status": "pending", "execution": None}, {"status": "cancelled", "execution": None}, None),  # never launched
        ({"status": "cancelled", "execution": "e1"}, {"status": "cancelled", "execution": "e1"}, None),  # a later write
        ({"status": "running", "execution": "e1"}, {"status": "completed", "execution": "e1"}, None),
        ({"status": "cancelled", "execution": "e1"}, None, None),  # deleted
    ],
)
def test_cancelled_execution(before, after, execution):
    assert cancelled_execution(before, after) == execution
