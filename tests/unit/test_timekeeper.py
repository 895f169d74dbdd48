"""shared.timekeeper: following runs on their engines, reaping, stopping, and one failing part not stopping the rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

import shared.timekeeper as timekeeper
from shared.hub import SweepOutcome
from shared.jobs import MAX_QUEUED, DatasetRef, Job, JobSpec, JobStatus, transition
from shared.launchers import LaunchError, RunState
from shared.timekeeper import Polled, follow
from tests.unit.queue_fakes import LaunchOnly, MemoryJobStore, RecordingLauncher

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
S = JobStatus
SPEC = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=2, lease_seconds=60)


def launched(job_id: str, *, at: datetime = NOW, running: bool = False, attempt: int = 1, spec: JobSpec = SPEC) -> Job:
    """A job claimed at `at` for `attempt` with its run recorded; running (heartbeat at `at`) if asked."""
    job = Job.new(job_id, spec, at).model_copy(update={"attempt": attempt})
    job = transition(job, S.SCHEDULED, at, execution=RecordingLauncher.handle(job.model_copy(update={"attempt": attempt})))
    return transition(job, S.RUNNING, at, heartbeat_at=at) if running else job


def test_rounds_close_even_when_following_jobs_fails(monkeypatch):
    swept = []

    class FailingStore:
        def __init__(self, db, settings) -> None:
            pass

        def active(self):
            raise RuntimeError("firestore unavailable")

    monkeypatch.setattr(timekeeper, "JobStore", FailingStore)
    monkeypatch.setattr(timekeeper, "sweep_deadlines", lambda svc, now: swept.append(now) or [SweepOutcome("fed-1", error="RuntimeError")])
    with pytest.raises(RuntimeError, match="firestore unavailable"):  # still reported, for the caller to log
        timekeeper.tick(SimpleNamespace(db=None, settings=None), NOW, RecordingLauncher())
    assert swept == [NOW]


@pytest.mark.parametrize("state", [RunState.FAILED, RunState.CANCELLED, RunState.GONE])
def test_a_run_the_engine_ended_loses_its_attempt_at_once(state):
    job = launched("j", running=True)
    store = MemoryJobStore([job])
    followed = follow(store, RecordingLauncher({job.execution: state}), NOW + timedelta(seconds=5))  # well within the lease

    reason = f"the engine reports its run {state.value} (fake:j/1)"
    assert followed.polled == [Polled("j", 1, "fake:j/1", state, "lost", reason)]
    after = store.docs["j"]
    assert (after.status, after.attempt, after.execution) == (S.PENDING, 2, None)
    assert after.history[-1].reason == reason
    assert followed.reaped == [] and followed.stopped == []  # nothing left to stop


def test_at_the_attempt_limit_a_lost_run_fails_the_job_with_the_engines_word():
    job = launched("j", running=True, attempt=2)
    store = MemoryJobStore([job])
    follow(store, RecordingLauncher({job.execution: RunState.FAILED}), NOW)
    after = store.docs["j"]
    assert after.status is S.FAILED
    assert after.error == "the engine reports its run failed (fake:j/2) (attempt 2 of 2)"


def test_a_queued_run_keeps_its_scheduled_attempt_alive_until_max_queued():
    job = launched("j")
    store, launcher = MemoryJobStore([job]), RecordingLauncher({"fake:j/1": RunState.QUEUED})
    later = NOW + timedelta(minutes=30)  # far past the 60 s lease

    followed = follow(store, launcher, later)
    assert [p.action for p in followed.polled] == ["waiting"] and followed.reaped == []
    assert store.docs["j"].status is S.SCHEDULED and store.docs["j"].heartbeat_at == later

    too_late = NOW + MAX_QUEUED + timedelta(minutes=2)
    followed = follow(store, launcher, too_late)
    assert [p.action for p in followed.polled] == ["none"]
    assert [(r.job.status, r.attempt, r.execution) for r in followed.reaped] == [(S.PENDING, 1, "fake:j/1")]
    assert launcher.stopped == ["fake:j/1"]  # the queue gave up on it: the engine must too


@pytest.mark.parametrize("state", [RunState.SUCCEEDED, RunState.RUNNING, RunState.ENDED])
def test_a_silent_worker_is_reaped_by_its_lease_whatever_the_engine_says_and_its_run_stopped(state):
    silent, alive = launched("silent", running=True), launched("alive", running=True, at=NOW + timedelta(seconds=50))
    store = MemoryJobStore([silent, alive])
    launcher = RecordingLauncher({silent.execution: state, alive.execution: state})
    followed = follow(store, launcher, NOW + timedelta(seconds=61))

    assert [p.action for p in followed.polled] == ["none", "none"]
    assert [(r.job.id, r.job.status, r.attempt) for r in followed.reaped] == [("silent", S.PENDING, 1)]
    assert "no heartbeat for 60s" in store.docs["silent"].history[-1].reason
    assert launcher.stopped == ["fake:silent/1"] and [s.outcome for s in followed.stopped] == ["stopped"]
    assert store.docs["alive"] == alive


def test_a_worker_that_reported_while_its_state_was_read_is_not_lost():
    job = launched("j", running=True)
    store = MemoryJobStore([job])

    class ReportsMeanwhile(RecordingLauncher):
        def state(self, execution):
            store.docs["j"] = transition(store.docs["j"], S.COMPLETED, NOW)  # the worker's report lands first
            return RunState.GONE

    followed = follow(store, ReportsMeanwhile(), NOW)
    assert [p.action for p in followed.polled] == ["none"]
    assert store.docs["j"].status is S.COMPLETED


def test_unknown_states_and_launchers_without_state_or_stop_do_not_stop_the_clock():
    broken, fine = launched("broken", running=True), launched("fine", running=True)
    store = MemoryJobStore([broken, fine])
    launcher = RecordingLauncher({broken.execution: LaunchError("permission denied"), fine.execution: RunState.FAILED})
    followed = follow(store, launcher, NOW)
    assert [(p.job_id, p.state, p.action, p.detail) for p in followed.polled] == [
        ("broken", None, "none", "permission denied"),
        ("fine", RunState.FAILED, "lost", "the engine reports its run failed (fake:fine/1)"),
    ]

    old = MemoryJobStore([launched("old", running=True)])
    followed = follow(old, LaunchOnly(), NOW + timedelta(seconds=61))
    assert [(p.state, p.detail) for p in followed.polled] == [(None, "LaunchOnly cannot read run states")]
    assert [r.job.status for r in followed.reaped] == [S.PENDING]
    assert [(s.outcome, s.detail) for s in followed.stopped] == [("unsupported", "LaunchOnly cannot stop runs")]

    no_launcher = MemoryJobStore([launched("any", running=True)])
    followed = follow(no_launcher, None, NOW + timedelta(seconds=61))
    assert followed.polled == [] and followed.stopped == [] and len(followed.reaped) == 1


def test_a_failed_stop_is_reported_not_raised():
    store = MemoryJobStore([launched("j", running=True)])
    launcher = RecordingLauncher({"fake:j/1": RunState.RUNNING}, stop_error=LaunchError("quota"))
    followed = follow(store, launcher, NOW + timedelta(seconds=61))
    assert [(s.execution, s.outcome, s.detail) for s in followed.stopped] == [("fake:j/1", "failed", "quota")]


def test_polling_is_bounded_and_the_longest_silent_go_first():
    jobs = [launched(f"j{i}", running=True, at=NOW - timedelta(seconds=i)) for i in range(5)]
    waiting = launched("no-run").model_copy(update={"execution": None})  # claimed, its launch not yet recorded
    launcher = RecordingLauncher({j.execution: RunState.RUNNING for j in jobs})
    follow(MemoryJobStore([*jobs, waiting]), launcher, NOW, max_polls=3)
    assert launcher.asked == ["fake:j4/1", "fake:j3/1", "fake:j2/1"]


def test_tick_keeps_its_callers_contract(monkeypatch):
    store = MemoryJobStore([launched("silent", running=True), launched("lost", running=True)])
    monkeypatch.setattr(timekeeper, "JobStore", lambda db, settings: store)
    monkeypatch.setattr(timekeeper, "sweep_deadlines", lambda svc, now: [])
    launcher = RecordingLauncher({"fake:silent/1": RunState.RUNNING, "fake:lost/1": RunState.FAILED})

    reaped, rounds = timekeeper.tick(SimpleNamespace(db=None, settings=None), NOW + timedelta(seconds=61), launcher)
    assert [(job.id, job.status, lost) for job, lost in reaped] == [("silent", S.PENDING, 1)]  # reaped for silence only
    assert rounds == []
    assert store.docs["lost"].attempt == 2 and launcher.stopped == ["fake:silent/1"]


def test_tick_follows_with_the_configured_launcher_and_reaps_without_one(monkeypatch, caplog):
    store = MemoryJobStore([launched("j", running=True)])
    monkeypatch.setattr(timekeeper, "JobStore", lambda db, settings: store)
    monkeypatch.setattr(timekeeper, "sweep_deadlines", lambda svc, now: [])
    monkeypatch.setenv("FEDPIPE_LAUNCHER", "no-such-engine")
    with caplog.at_level("ERROR", logger="fedpipe.timekeeper"):
        reaped, _ = timekeeper.tick(SimpleNamespace(db=None, settings=None), NOW + timedelta(seconds=61))
    assert [job.id for job, _ in reaped] == ["j"]
    assert "reaping by lease only" in caplog.text
