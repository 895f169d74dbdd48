"""Every engine's own states, mapped to RunState: each mapping by value, in the engine library's own types."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.cloud import aiplatform_v1, batch_v1, compute_v1, run_v2
from kubernetes import client as k8s

from shared.launchers import RunState
from shared.launchers.batch_runs import batch_run_state
from shared.launchers.cloud_run import execution_run_state
from shared.launchers.confidential_space import instance_run_state
from shared.launchers.gke import job_run_state, jobset_run_state
from shared.launchers.vertex import custom_job_run_state

pytestmark = pytest.mark.unit

R = RunState
DONE = datetime(2025, 1, 2, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("execution", "state"),
    [
        (run_v2.Execution(task_count=1), R.QUEUED),
        (run_v2.Execution(task_count=1, running_count=1), R.RUNNING),
        (run_v2.Execution(task_count=1, succeeded_count=1, completion_time=DONE), R.SUCCEEDED),
        (run_v2.Execution(task_count=1, failed_count=1, completion_time=DONE), R.FAILED),
        (run_v2.Execution(task_count=1, cancelled_count=1, completion_time=DONE), R.CANCELLED),
        (run_v2.Execution(task_count=2, succeeded_count=1, completion_time=DONE), R.FAILED),  # a task never ran
    ],
)
def test_cloud_run_execution(execution, state):
    assert execution_run_state(execution) is state


def test_confidential_space_vm():
    statuses = [s for s in compute_v1.Instance.Status.__members__ if s != "UNDEFINED_STATUS"]
    assert {s: instance_run_state(compute_v1.Instance(status=s)) for s in statuses} == {
        "DEPROVISIONING": R.ENDED, "PENDING": R.QUEUED, "PENDING_STOP": R.ENDED, "PROVISIONING": R.QUEUED, "REPAIRING": R.RUNNING,
        "RUNNING": R.RUNNING, "STAGING": R.QUEUED, "STOPPED": R.ENDED, "STOPPING": R.ENDED, "SUSPENDED": R.ENDED,
        "SUSPENDING": R.ENDED, "TERMINATED": R.ENDED,
    }


def test_batch_job():
    State = batch_v1.JobStatus.State
    assert {s.name: batch_run_state(batch_v1.Job(status=batch_v1.JobStatus(state=s))) for s in State} == {
        "STATE_UNSPECIFIED": R.QUEUED, "QUEUED": R.QUEUED, "SCHEDULED": R.QUEUED, "RUNNING": R.RUNNING, "SUCCEEDED": R.SUCCEEDED,
        "FAILED": R.FAILED, "DELETION_IN_PROGRESS": R.CANCELLED, "CANCELLATION_IN_PROGRESS": R.CANCELLED, "CANCELLED": R.CANCELLED,
    }


def test_vertex_custom_job():
    assert {s.name: custom_job_run_state(aiplatform_v1.CustomJob(state=s)) for s in aiplatform_v1.JobState} == {
        "JOB_STATE_UNSPECIFIED": R.QUEUED, "JOB_STATE_QUEUED": R.QUEUED, "JOB_STATE_PENDING": R.QUEUED, "JOB_STATE_PAUSED": R.QUEUED,
        "JOB_STATE_RUNNING": R.RUNNING, "JOB_STATE_UPDATING": R.RUNNING, "JOB_STATE_SUCCEEDED": R.SUCCEEDED,
        "JOB_STATE_PARTIALLY_SUCCEEDED": R.FAILED, "JOB_STATE_FAILED": R.FAILED, "JOB_STATE_EXPIRED": R.FAILED,
        "JOB_STATE_CANCELLING": R.CANCELLED, "JOB_STATE_CANCELLED": R.CANCELLED,
    }


def condition(kind: str, status: str = "True") -> k8s.V1JobCondition:
    return k8s.V1JobCondition(type=kind, status=status)


@pytest.mark.parametrize(
    ("job", "state"),
    [
        (k8s.V1Job(), R.QUEUED),  # just created: no status yet
        (k8s.V1Job(status=k8s.V1JobStatus(active=1, ready=0)), R.QUEUED),  # its pod waits for a node
        (k8s.V1Job(status=k8s.V1JobStatus(active=1, ready=1)), R.RUNNING),
        (k8s.V1Job(status=k8s.V1JobStatus(ready=1, conditions=[condition("Suspended")])), R.QUEUED),
        (k8s.V1Job(status=k8s.V1JobStatus(conditions=[condition("SuccessCriteriaMet"), condition("Complete")])), R.SUCCEEDED),
        (k8s.V1Job(status=k8s.V1JobStatus(conditions=[condition("FailureTarget")])), R.FAILED),  # failing: pods being ended
        (k8s.V1Job(status=k8s.V1JobStatus(conditions=[condition("Failed")])), R.FAILED),
        (k8s.V1Job(status=k8s.V1JobStatus(ready=1, conditions=[condition("Failed", "False")])), R.RUNNING),
        (k8s.V1Job(metadata=k8s.V1ObjectMeta(deletion_timestamp=DONE), status=k8s.V1JobStatus(ready=1)), R.CANCELLED),
    ],
)
def test_gke_job(job, state):
    assert job_run_state(job) is state


@pytest.mark.parametrize(
    ("jobset", "state"),
    [
        ({}, R.QUEUED),
        ({"status": {"replicatedJobsStatus": [{"name": "w", "ready": 0, "active": 1}]}}, R.QUEUED),  # not every pod is up
        ({"status": {"replicatedJobsStatus": [{"name": "w", "ready": 1, "active": 1}]}}, R.RUNNING),
        ({"status": {"conditions": [{"type": "Suspended", "status": "True"}], "replicatedJobsStatus": [{"ready": 1}]}}, R.QUEUED),
        ({"status": {"conditions": [{"type": "Completed", "status": "True"}]}}, R.SUCCEEDED),
        ({"status": {"terminalState": "Completed"}}, R.SUCCEEDED),
        ({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}, R.FAILED),
        ({"status": {"terminalState": "Failed"}}, R.FAILED),
        ({"metadata": {"deletionTimestamp": "2025-01-02T04:00:00Z"}, "status": {"replicatedJobsStatus": [{"ready": 1}]}}, R.CANCELLED),
    ],
)
def test_gke_jobset(jobset, state):
    assert jobset_run_state(jobset) is state
