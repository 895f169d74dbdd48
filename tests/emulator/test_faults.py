"""Bad input, failing functions, poison events and dead workers: nothing lost, nothing corrupted."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from google.api_core.exceptions import AlreadyExists

from emulators.launcher import worker_pid_file
from shared.datasets import SPEC_OBJECT
from shared.jobs import DatasetRef, Job, JobSpec, JobStatus, TrainSpec, utcnow
from shared.jobstore import JobStore
from tests.conftest import wait_for
from tests.emulator.helpers import dataset_doc, delivered, deliveries, job_of_dataset, upload_digits, wait_job

pytestmark = pytest.mark.emulator

SPEC = {"features": ["a", "b"], "label": "y", "num_classes": 2, "expected_files": ["good.csv", "bad.csv"], "train": {"epochs": 5}}
GOOD = b"a,b,y\n" + b"".join(f"{i},{i % 7},{i % 2}\n".encode() for i in range(40))


def _quarantined(clients, source: str) -> list[dict]:
    docs = clients.db.collection(clients.settings.quarantine_collection).stream()
    return [d.to_dict() for d in docs if d.get("source") == source]


def test_malformed_file_is_quarantined_once_and_the_data_set_recovers(cloud, clients):
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    bucket.blob(f"quar/{SPEC_OBJECT}").upload_from_string(json.dumps(SPEC))
    bucket.blob("quar/good.csv").upload_from_string(GOOD)
    bad = b"a,b,y\n1,2,0\n3,oops,1\n"
    bucket.blob("quar/bad.csv").upload_from_string(bad)

    source = f"gs://{bucket.name}/quar/bad.csv"
    record = wait_for(lambda: _quarantined(clients, source), 30, "the bad file in quarantine")[0]
    assert record["reason"] == "non_numeric"
    assert "b" in record["detail"] and "row 2" in record["detail"]
    copy_bucket, copy_name = record["kept_at"].removeprefix("gs://").split("/", 1)
    assert copy_bucket == clients.settings.quarantine_bucket("us")
    assert clients.gcs.bucket(copy_bucket).blob(copy_name).download_as_bytes() == bad  # kept, byte for byte
    [delivery] = delivered(clients, lambda r: r["subject"] == "objects/quar/bad.csv", 1)
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)  # acknowledged, never retried
    assert dataset_doc(clients, "us", "quar")["status"] == "collecting"

    # A corrected upload of the same name completes the data set.
    bucket.blob("quar/bad.csv").upload_from_string(b"a,b,y\n1,2,0\n3,4,1\n")
    job = wait_job(clients, job_of_dataset(clients, "quar"), {"completed", "failed"})
    assert job.status is JobStatus.COMPLETED
    assert dataset_doc(clients, "us", "quar")["rows"] == 42


def test_invalid_declaration_is_quarantined(cloud, clients):
    bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
    bucket.blob(f"badspec/{SPEC_OBJECT}").upload_from_string(json.dumps({**SPEC, "label": "a"}))
    record = wait_for(lambda: _quarantined(clients, f"gs://{bucket.name}/badspec/{SPEC_OBJECT}"), 30, "the declaration in quarantine")[0]
    assert record["reason"] == "bad_spec"
    assert "also listed as a feature" in record["detail"]
    assert dataset_doc(clients, "us", "badspec") == {}


def test_a_function_that_is_down_gets_its_events_once_it_is_back(cloud, clients):
    cloud.stop_function("on_raw_upload")
    try:
        bucket = clients.gcs.bucket(clients.settings.raw_bucket("us"))
        bucket.blob(f"retry/{SPEC_OBJECT}").upload_from_string(json.dumps(SPEC))
        wait_for(
            lambda: [r for r in deliveries(clients, lambda r: r["subject"] == f"objects/retry/{SPEC_OBJECT}") if r["status"] == "retrying"],
            30, "a failed first attempt",
        )
    finally:
        cloud.start_function("on_raw_upload")
    record = wait_for(
        lambda: [r for r in deliveries(clients, lambda r: r["subject"] == f"objects/retry/{SPEC_OBJECT}") if r["status"] == "delivered"],
        30, "delivery after the function came back",
    )[0]
    assert record["attempts"] >= 2
    assert dataset_doc(clients, "us", "retry")["spec"]["label"] == "y"


def test_an_event_that_keeps_failing_is_dead_lettered_after_max_attempts(cloud, clients):
    settings = clients.settings
    dlq = clients.subscriber.subscription_path(settings.project, "test-dead-letters")
    try:
        clients.subscriber.create_subscription(name=dlq, topic=clients.publisher.topic_path(settings.project, settings.dead_letter_topic))
    except AlreadyExists:
        pass
    cloud.stop_function("on_tick")  # down for longer than every attempt takes
    try:
        topic = clients.publisher.topic_path(settings.project, settings.tick_topic)
        message_id = clients.publisher.publish(topic, b"{}").result()
        record = wait_for(
            lambda: [r for r in deliveries(clients, lambda r: r["event_id"] == message_id) if r["status"] == "dead_lettered"],
            60, "the event to be dead-lettered",
        )[0]
    finally:
        cloud.start_function("on_tick")
    assert record["attempts"] == cloud.options.router.retry.max_attempts
    assert record["last_code"] is None  # no answer: connection refused
    pulled = clients.subscriber.pull(subscription=dlq, max_messages=10, timeout=10)
    dead = [json.loads(m.message.data) for m in pulled.received_messages]
    assert [d["event"]["headers"]["ce-id"] for d in dead if d["trigger"] == "tick"] == [message_id]


def test_malformed_message_is_acknowledged_not_retried(cloud, clients):
    topic = clients.publisher.topic_path(clients.settings.project, clients.settings.shard_ready_topic)
    message_id = clients.publisher.publish(topic, b"not json at all").result()
    record = wait_for(lambda: deliveries(clients, lambda r: r["event_id"] == message_id), 30, "the delivery")[0]
    assert (record["status"], record["attempts"]) == ("delivered", 1)


def test_killed_worker_is_reaped_and_its_job_retried(cloud, clients):
    upload_digits(clients, "reap", parts=1, train=TrainSpec(epochs=1))
    wait_job(clients, job_of_dataset(clients, "reap"), {"completed"})
    store = JobStore(clients.db, clients.settings)
    spec = JobSpec(dataset=DatasetRef(node="us", dataset="reap"), train=TrainSpec(epochs=400), max_attempts=2, lease_seconds=2)
    job = Job.new("reap-killed-worker", spec, utcnow())
    assert store.create(job)

    wait_for(lambda: (j := store.get(job.id)) and j.status is JobStatus.RUNNING and j.progress.get("epoch", 0) >= 1, 60, "attempt 1 training")
    pid = int(worker_pid_file(Path(cloud.endpoints.state_dir), job.id, 1).read_text())
    os.killpg(pid, signal.SIGKILL)

    done = wait_job(clients, job.id, {"completed", "failed"}, timeout_s=120)
    assert done.status is JobStatus.COMPLETED, done.error
    assert done.attempt == 2
    statuses = [(t.status.value, t.attempt) for t in done.history]
    assert statuses == [("pending", 1), ("scheduled", 1), ("running", 1), ("pending", 2), ("scheduled", 2), ("running", 2), ("completed", 2)]
    # Lost either way: the clock's poll finds the dead process, or its lease runs out first.
    lost = done.history[3].reason
    assert "no heartbeat" in lost or lost.startswith("the engine reports its run"), lost


def test_job_that_keeps_dying_fails_after_its_attempt_limit(cloud, clients):
    store = JobStore(clients.db, clients.settings)
    # A data set that does not exist makes the worker fail fast with a clear error.
    spec = JobSpec(dataset=DatasetRef(node="us", dataset="missing"), max_attempts=1)
    job = Job.new("fails-cleanly", spec, utcnow())
    assert store.create(job)
    done = wait_job(clients, job.id, {"completed", "failed"})
    assert done.status is JobStatus.FAILED
    assert "not complete" in done.error


def test_scheduler_tick_reaches_the_tick_function(cloud, clients):
    topic = clients.publisher.topic_path(clients.settings.project, clients.settings.tick_topic)
    message_id = clients.publisher.publish(topic, b"{}").result()
    record = wait_for(lambda: deliveries(clients, lambda r: r["event_id"] == message_id), 30, "the tick delivery")[0]
    assert (record["function"], record["status"], record["attempts"]) == ("on_tick", "delivered", 1)


def test_a_crashed_function_is_revived_and_its_events_still_arrive(cloud, clients):
    from emulators.processes import kill_group

    [proc] = [p for p in cloud.processes if p.name == "function-on_shard_ready"]
    kill_group(proc.pid, grace_s=0)
    wait_for(lambda: not proc.alive(), 10, "the function to die")
    topic = clients.publisher.topic_path(clients.settings.project, clients.settings.shard_ready_topic)
    message_id = clients.publisher.publish(topic, b"not json").result()
    assert cloud.revive_functions() == ["on_shard_ready"]
    assert cloud.revive_functions() == []  # nothing else is down
    record = wait_for(
        lambda: [r for r in deliveries(clients, lambda r: r["event_id"] == message_id) if r["status"] == "delivered"], 30, "the delivery"
    )[0]
    assert record["function"] == "on_shard_ready"


def test_workers_fork_from_the_warm_zygote_each_in_its_own_session(cloud, clients, tmp_path):
    from emulators.launcher import spawn_from_zygote

    upload_digits(clients, "zygote", parts=1, train=TrainSpec(epochs=1))
    wait_job(clients, job_of_dataset(clients, "zygote"), {"completed"})
    store = JobStore(clients.db, clients.settings)
    job = Job.new("zygote-child", JobSpec(dataset=DatasetRef(node="us", dataset="zygote"), train=TrainSpec(epochs=400)), utcnow())
    assert store.create(job)
    wait_for(lambda: (j := store.get(job.id)) and j.status is JobStatus.RUNNING, 60, "the worker running")

    pid = int(worker_pid_file(Path(cloud.endpoints.state_dir), job.id, 1).read_text())
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == cloud.endpoints.pids["worker-zygote"]
    assert os.getsid(pid) == pid  # its own session: stopped by group, apart from the zygote
    assert f"job {job.id} attempt 1 running" in (Path(cloud.endpoints.state_dir) / "logs" / "jobs" / f"{job.id}.1.log").read_text()
    store.cancel(job.id, utcnow())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0],
             30, "the cancelled worker to exit")
    # No zygote there: the launcher starts a plain process instead.
    assert spawn_from_zygote(tmp_path / "none.sock", {}, tmp_path / "log") is None
