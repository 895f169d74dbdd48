"""shared.jobs: the job state machine, retries, leases and the document round trip."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.jobs import (
    TERMINAL,
    TRANSITIONS,
    DatasetRef,
    InvalidTransition,
    Job,
    JobSpec,
    JobStatus,
    TrainSpec,
    is_lease_expired,
    is_valid_transition,
    retry_or_fail,
    transition,
)

pytestmark = pytest.mark.unit

S = JobStatus
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SPEC = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=3, lease_seconds=60.0)

ALLOWED = {
    (S.PENDING, S.SCHEDULED),
    (S.PENDING, S.CANCELLED),
    (S.SCHEDULED, S.RUNNING),
    (S.SCHEDULED, S.PENDING),
    (S.SCHEDULED, S.FAILED),
    (S.SCHEDULED, S.CANCELLED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.PENDING),
    (S.RUNNING, S.CANCELLED),
}
ALL_PAIRS = list(itertools.product(list(S), repeat=2))
FORBIDDEN = [pair for pair in ALL_PAIRS if pair not in ALLOWED]


def job_in(status: JobStatus, *, attempt: int = 1, spec: JobSpec = SPEC, **fields) -> Job:
    job = Job.new("job-1", spec, T0)
    return job.model_copy(update={"status": status, "attempt": attempt, **fields})


# -- the transition table -----------------------------------------------------


def test_there_are_six_statuses():
    assert {s.value for s in S} == {"pending", "scheduled", "running", "completed", "failed", "cancelled"}


def test_table_is_exactly_the_documented_pairs():
    assert set(TRANSITIONS) == ALLOWED
    assert len(FORBIDDEN) == 36 - 10


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED), ids=lambda s: str(s))
def test_every_allowed_pair_works(current, target):
    assert is_valid_transition(current, target)
    job = job_in(current)
    moved = transition(job, target, T0 + timedelta(seconds=5), reason="because")
    assert moved.status is target
    assert moved.updated_at == T0 + timedelta(seconds=5)
    assert job.status is current  # the input is not mutated


@pytest.mark.parametrize(("current", "target"), FORBIDDEN, ids=lambda s: str(s))
def test_every_other_pair_raises(current, target):
    assert not is_valid_transition(current, target)
    job = job_in(current)
    with pytest.raises(InvalidTransition) as info:
        transition(job, target, T0)
    assert info.value.current is current
    assert info.value.target is target
    assert "job-1" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_self_transitions_are_refused():
    for status in S:
        assert not is_valid_transition(status, status)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_have_no_way_out(terminal):
    assert TERMINAL == {S.COMPLETED, S.FAILED, S.CANCELLED}
    assert not any(current == terminal for current, _ in TRANSITIONS)
    job = job_in(terminal)
    assert job.is_terminal
    for target in S:
        with pytest.raises(InvalidTransition):
            transition(job, target, T0)


def test_non_terminal_states_are_not_terminal():
    for status in (S.PENDING, S.SCHEDULED, S.RUNNING):
        assert not job_in(status).is_terminal


# -- transition's effects -----------------------------------------------------


@pytest.mark.parametrize(("current", "target"), sorted(p for p in ALLOWED if p[1] is not S.PENDING), ids=lambda s: str(s))
def test_attempt_is_kept_unless_going_back_to_pending(current, target):
    job = job_in(current, attempt=2, execution="local:pid=1", heartbeat_at=T0, progress={"epoch": 3.0})
    moved = transition(job, target, T0 + timedelta(seconds=1))
    assert moved.attempt == 2
    assert moved.execution == "local:pid=1"
    assert moved.heartbeat_at == T0
    assert moved.progress == {"epoch": 3.0}


@pytest.mark.parametrize("current", [S.SCHEDULED, S.RUNNING])
def test_back_to_pending_bumps_attempt_and_clears_the_attempt_state(current):
    job = job_in(current, attempt=2, execution="local:pid=1", heartbeat_at=T0, progress={"epoch": 3.0})
    moved = transition(job, S.PENDING, T0 + timedelta(seconds=1), reason="lease expired")
    assert moved.status is S.PENDING
    assert moved.attempt == 3
    assert moved.execution is None
    assert moved.heartbeat_at is None
    assert moved.progress == {}
    assert moved.history[-1].attempt == 3


def test_history_grows_by_one_entry_with_the_reason():
    job = Job.new("job-1", SPEC, T0)
    assert len(job.history) == 1
    assert job.history[0].status is S.PENDING and job.history[0].attempt == 1 and job.history[0].at == T0
    t1 = T0 + timedelta(seconds=10)
    scheduled = transition(job, S.SCHEDULED, t1, reason="claimed")
    assert len(scheduled.history) == 2
    assert scheduled.history[:1] == job.history
    last = scheduled.history[-1]
    assert (last.status, last.at, last.attempt, last.reason) == (S.SCHEDULED, t1, 1, "claimed")
    running = transition(scheduled, S.RUNNING, t1 + timedelta(seconds=1))
    assert len(running.history) == 3
    assert running.history[-1].reason is None
    assert len(job.history) == 1  # the original is untouched


def test_transition_applies_extra_changes():
    job = job_in(S.RUNNING)
    done = transition(job, S.COMPLETED, T0, results={"accuracy": 0.9})
    assert done.results == {"accuracy": 0.9}
    assert done.status is S.COMPLETED


# -- retry_or_fail ------------------------------------------------------------


@pytest.mark.parametrize("current", [S.SCHEDULED, S.RUNNING])
def test_retry_while_attempts_remain(current):
    job = job_in(current, attempt=1)
    retried = retry_or_fail(job, T0, "worker lost")
    assert retried.status is S.PENDING
    assert retried.attempt == 2
    assert retried.error is None
    assert retried.history[-1].reason == "worker lost"
    again = retry_or_fail(job_in(current, attempt=2), T0, "worker lost")
    assert again.status is S.PENDING and again.attempt == 3


@pytest.mark.parametrize("current", [S.SCHEDULED, S.RUNNING])
def test_fail_at_the_attempt_limit(current):
    job = job_in(current, attempt=3)
    failed = retry_or_fail(job, T0, "worker lost")
    assert failed.status is S.FAILED
    assert failed.attempt == 3
    assert failed.error == "worker lost (attempt 3 of 3)"
    assert "attempt 3 of 3" in failed.error
    assert failed.history[-1].status is S.FAILED and failed.history[-1].reason == "worker lost"


def test_single_attempt_spec_fails_at_once():
    spec = SPEC.model_copy(update={"max_attempts": 1})
    failed = retry_or_fail(job_in(S.RUNNING, spec=spec), T0, "boom")
    assert failed.status is S.FAILED
    assert "attempt 1 of 1" in failed.error


def test_retry_or_fail_on_a_terminal_job_raises():
    with pytest.raises(InvalidTransition):
        retry_or_fail(job_in(S.COMPLETED), T0, "late")


# -- leases -------------------------------------------------------------------


@pytest.mark.parametrize("status", [S.SCHEDULED, S.RUNNING])
def test_lease_uses_updated_at_without_a_heartbeat(status):
    job = job_in(status, updated_at=T0, heartbeat_at=None)
    assert not is_lease_expired(job, T0 + timedelta(seconds=59))
    assert not is_lease_expired(job, T0 + timedelta(seconds=60))  # exactly at the lease: not expired
    assert is_lease_expired(job, T0 + timedelta(seconds=60, microseconds=1))
    assert is_lease_expired(job, T0 + timedelta(seconds=61))


@pytest.mark.parametrize("status", [S.SCHEDULED, S.RUNNING])
def test_lease_uses_heartbeat_when_present(status):
    beat = T0 + timedelta(seconds=100)
    job = job_in(status, updated_at=T0, heartbeat_at=beat)
    # Long past updated_at + lease, but the heartbeat is recent.
    assert not is_lease_expired(job, T0 + timedelta(seconds=150))
    assert not is_lease_expired(job, beat + timedelta(seconds=60))
    assert is_lease_expired(job, beat + timedelta(seconds=61))


@pytest.mark.parametrize("status", [S.PENDING, S.COMPLETED, S.FAILED, S.CANCELLED])
def test_only_scheduled_or_running_jobs_expire(status):
    job = job_in(status, updated_at=T0)
    assert not is_lease_expired(job, T0 + timedelta(days=365))


def test_lease_length_comes_from_the_spec():
    spec = SPEC.model_copy(update={"lease_seconds": 5.0})
    job = job_in(S.RUNNING, spec=spec, updated_at=T0)
    assert not is_lease_expired(job, T0 + timedelta(seconds=5))
    assert is_lease_expired(job, T0 + timedelta(seconds=6))


# -- documents ----------------------------------------------------------------


def test_new_job_defaults():
    job = Job.new("job-1", SPEC, T0)
    assert job.status is S.PENDING
    assert job.attempt == 1
    assert job.created_at == job.updated_at == T0
    assert job.heartbeat_at is None and job.execution is None and job.error is None
    assert job.progress == {} and job.results == {}


def test_doc_round_trip():
    job = transition(Job.new("job-1", SPEC, T0), S.SCHEDULED, T0 + timedelta(seconds=1), reason="claimed", execution="x")
    job = transition(job, S.RUNNING, T0 + timedelta(seconds=2), heartbeat_at=T0 + timedelta(seconds=2), progress={"epoch": 1.0})
    doc = job.to_doc()
    assert "id" not in doc
    assert doc["status"] == "running"
    assert doc["spec"]["dataset"] == {"node": "us", "dataset": "iris", "version": None}
    assert len(doc["history"]) == 3
    back = Job.from_doc("job-1", doc)
    assert back == job
    assert back.id == "job-1"
    assert back.history[1].reason == "claimed"


def test_from_doc_takes_the_id_from_the_argument():
    doc = Job.new("job-1", SPEC, T0).to_doc()
    assert Job.from_doc("other", doc).id == "other"


@pytest.mark.parametrize("bad_id", ["", "a/b", "x" * 201])
def test_invalid_job_ids_are_refused(bad_id):
    with pytest.raises(ValidationError):
        Job.new(bad_id, SPEC, T0)
    with pytest.raises(ValidationError):
        Job.from_doc(bad_id, Job.new("ok", SPEC, T0).to_doc())


def test_longest_valid_id_is_accepted():
    assert Job.new("x" * 200, SPEC, T0).id == "x" * 200


# -- spec validation ----------------------------------------------------------


def test_dataset_ref_id():
    assert DatasetRef(node="us", dataset="iris").id == "us~iris"


@pytest.mark.parametrize(
    "train",
    [{"epochs": 0}, {"learning_rate": 0}, {"learning_rate": -0.1}, {"batch_size": 0}, {"test_fraction": 1.0}, {"model": "svm"}],
)
def test_bad_train_specs_are_refused(train):
    with pytest.raises(ValidationError):
        TrainSpec(**train)
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"dataset": {"node": "us", "dataset": "iris"}, "train": train})


def test_max_attempts_zero_is_refused():
    with pytest.raises(ValidationError):
        JobSpec(dataset=DatasetRef(node="us", dataset="iris"), max_attempts=0)


def test_lease_seconds_must_be_positive():
    with pytest.raises(ValidationError):
        JobSpec(dataset=DatasetRef(node="us", dataset="iris"), lease_seconds=0)


def test_valid_spec_boundaries_are_accepted():
    train = TrainSpec(epochs=1, learning_rate=1e-9, batch_size=1)
    spec = JobSpec(dataset=DatasetRef(node="us", dataset="iris"), train=train, max_attempts=1)
    assert spec.train.epochs == 1 and spec.max_attempts == 1


# -- the reaper's sweep over job documents (issue 8) --------------------------------------


def test_one_bad_job_document_is_skipped_and_logged_by_id_only(caplog):
    from shared.jobstore import parse_jobs

    silent = job_in(S.RUNNING, heartbeat_at=T0)
    alive = job_in(S.RUNNING, heartbeat_at=T0 + timedelta(seconds=100))
    naive = {**silent.to_doc(), "updated_at": datetime(2024, 5, 1), "heartbeat_at": datetime(2024, 5, 1)}
    docs = [
        ("bad-missing-fields", {"status": "running", "note": "SECRET-123-45-6789"}),
        ("silent-1", silent.to_doc()),
        ("bad-wrong-types", {**silent.to_doc(), "attempt": "SECRET-123-45-6789", "spec": "SECRET-123-45-6789"}),
        ("bad-empty", None),
        ("bad-naive-time", naive),
        ("alive", alive.to_doc()),
        ("silent-2", silent.to_doc()),
    ]
    with caplog.at_level("ERROR", logger="fedpipe.jobstore"):
        jobs = parse_jobs(docs)
    assert [j.id for j in jobs] == ["silent-1", "alive", "silent-2"]
    assert [j.id for j in jobs if is_lease_expired(j, T0 + timedelta(seconds=120))] == ["silent-1", "silent-2"]
    assert jobs[0].model_copy(update={"id": "job-1"}) == silent
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4
    for job_id, line in zip(["bad-missing-fields", "bad-wrong-types", "bad-empty", "bad-naive-time"], logged):
        assert repr(job_id) in line and "skipped" in line
    assert not any("SECRET" in line or "running" in line for line in logged)


def test_the_clocks_listing_goes_on_past_a_bad_job_document():
    from types import SimpleNamespace

    from shared.jobstore import JobStore

    silent = job_in(S.RUNNING, heartbeat_at=T0)
    docs = {"a-bad": {"status": "running", "note": "SECRET-123-45-6789"}, "b-silent": silent.to_doc()}
    snaps = [SimpleNamespace(id=i, to_dict=lambda d=d: d) for i, d in docs.items()]
    store = JobStore.__new__(JobStore)
    store.collection = SimpleNamespace(where=lambda **_: SimpleNamespace(stream=lambda: iter(snaps)))
    assert [j.id for j in store.active()] == ["b-silent"]


# -- waiting in an engine's queue ----------------------------------------------------------


def test_a_scheduled_attempt_may_wait_queued_up_to_max_queued_since_its_claim():
    from shared.jobs import MAX_QUEUED, may_wait_queued, scheduled_at

    claimed = transition(transition(Job.new("job-1", SPEC, T0), S.SCHEDULED, T0), S.PENDING, T0)  # attempt 1 lost at once
    claimed = transition(claimed, S.SCHEDULED, T0 + timedelta(minutes=5))  # attempt 2's claim
    assert scheduled_at(claimed) == T0 + timedelta(minutes=5)
    assert may_wait_queued(claimed, T0 + timedelta(minutes=5) + MAX_QUEUED)
    assert not may_wait_queued(claimed, T0 + timedelta(minutes=5) + MAX_QUEUED + timedelta(seconds=1))
    running = transition(claimed, S.RUNNING, T0 + timedelta(minutes=6))
    assert not may_wait_queued(running, T0 + timedelta(minutes=7))  # a worker that started heartbeats
    assert scheduled_at(Job.new("job-2", SPEC, T0)) is None
