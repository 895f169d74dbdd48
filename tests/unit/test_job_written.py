"""functions/job_written.py: a pending job is launched, a write that cancels a job stops its run, other writes do nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from cloudevents.http import CloudEvent
from google.events.cloud.firestore_v1 import Document, DocumentEventData, Value

import functions.job_written as job_written
from shared.jobs import DatasetRef, Job, JobSpec, JobStatus
from shared.launchers import LaunchError
from tests.unit.queue_fakes import LaunchOnly, MemoryJobStore, RecordingLauncher

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NAME = "projects/p/databases/(default)/documents/jobs/j"


def document(status: str, execution: str | None) -> Document:
    run = Value(string_value=execution) if execution else Value(null_value=0)
    return Document(name=NAME, fields={"status": Value(string_value=status), "execution": run})


def event(before: Document | None, after: Document | None) -> CloudEvent:
    data = DocumentEventData(old_value=before, value=after) if before else DocumentEventData(value=after)
    attributes = {"type": "google.cloud.firestore.document.v1.written", "source": "//firestore.googleapis.com/projects/p/databases/(default)"}
    return CloudEvent(attributes, DocumentEventData.serialize(data))


@pytest.fixture
def wired(monkeypatch):
    store, launcher = MemoryJobStore([Job.new("j", JobSpec(dataset=DatasetRef(node="us", dataset="iris")), NOW)]), RecordingLauncher()
    monkeypatch.setattr(job_written, "clients", SimpleNamespace(db=lambda: None, settings=lambda: None))
    monkeypatch.setattr(job_written, "JobStore", lambda db, settings: store)
    monkeypatch.setattr(job_written, "launcher_from_env", lambda: launcher)
    return SimpleNamespace(store=store, launcher=launcher, monkeypatch=monkeypatch)


def test_a_pending_job_is_launched_once_however_often_its_event_arrives(wired):
    for _ in range(2):
        job_written.on_job_written(event(None, document("pending", None)))
    assert wired.launcher.launched == [("j", 1)]
    assert wired.store.docs["j"].status is JobStatus.SCHEDULED


def test_the_write_that_cancels_a_running_job_stops_its_run_and_a_redelivery_stops_it_again(wired):
    cancel = event(document("running", "fake:j/1"), document("cancelled", "fake:j/1"))
    job_written.on_job_written(cancel)
    job_written.on_job_written(cancel)
    assert wired.launcher.stopped == ["fake:j/1", "fake:j/1"]  # stopping twice is stopping once
    assert wired.launcher.launched == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (document("cancelled", "fake:j/1"), document("cancelled", "fake:j/1")),  # a later write to a cancelled job
        (document("pending", None), document("cancelled", None)),  # never launched: nothing runs
        (document("running", "fake:j/1"), document("running", "fake:j/1")),  # a heartbeat
        (document("scheduled", None), document("scheduled", "fake:j/1")),  # the launch's own write
    ],
)
def test_other_writes_neither_launch_nor_stop(wired, before, after):
    job_written.on_job_written(event(before, after))
    assert wired.launcher.stopped == [] and wired.launcher.launched == []


def test_a_stop_that_failed_is_raised_for_redelivery_and_one_that_cannot_be_done_is_not(wired):
    cancel = event(document("running", "fake:j/1"), document("cancelled", "fake:j/1"))
    wired.monkeypatch.setattr(job_written, "launcher_from_env", lambda: RecordingLauncher(stop_error=LaunchError("unavailable")))
    with pytest.raises(RuntimeError, match="could not stop fake:j/1: unavailable"):
        job_written.on_job_written(cancel)
    wired.monkeypatch.setattr(job_written, "launcher_from_env", LaunchOnly)
    job_written.on_job_written(cancel)  # logged: nothing to retry
