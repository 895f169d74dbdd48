"""A Cloud Batch job as one attempt's run: create it, read its state, stop it.

Shared by the confidential Batch launcher (batch.py) and the accelerator one
(batch_gpu.py). Batch lets the client choose the job id, so the id derives from
(job id, attempt) and a retried create meets AlreadyExists: the run it started before.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from google.cloud import batch_v1
from google.protobuf import duration_pb2

from shared.jobs import Job
from shared.launchers import RunState, gcp
from shared.launchers.naming import job_labels, request_id

State = batch_v1.JobStatus.State
_STATES = {
    State.STATE_UNSPECIFIED: RunState.QUEUED,
    State.QUEUED: RunState.QUEUED,
    State.SCHEDULED: RunState.QUEUED,  # VMs being made for it
    State.RUNNING: RunState.RUNNING,
    State.SUCCEEDED: RunState.SUCCEEDED,
    State.FAILED: RunState.FAILED,
    State.CANCELLATION_IN_PROGRESS: RunState.CANCELLED,
    State.CANCELLED: RunState.CANCELLED,
    State.DELETION_IN_PROGRESS: RunState.CANCELLED,
}


def task_spec(container: batch_v1.Runnable.Container, env: Mapping[str, str], max_run: timedelta) -> batch_v1.TaskSpec:
    """One task: the worker's container, its environment, a bounded run, and no retry of Batch's own
    (the job queue owns retries, with a new attempt number each; a silent retry would run one attempt twice)."""
    return batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(container=container)],
        environment=batch_v1.Environment(variables=dict(env)),
        max_retry_count=0,
        max_run_duration=duration_pb2.Duration(seconds=int(max_run.total_seconds())),
    )


def create_job_request(
    parent: str, job_id: str, job: Job, group: batch_v1.TaskGroup, allocation: batch_v1.AllocationPolicy
) -> batch_v1.CreateJobRequest:
    """The CreateJob request for one attempt's Batch job, labelled and logged like every fedpipe run."""
    return batch_v1.CreateJobRequest(
        parent=parent,
        job_id=job_id,
        request_id=request_id("batch-job", parent, job_id),
        job=batch_v1.Job(
            task_groups=[group],
            allocation_policy=allocation,
            labels=job_labels(job, job_id),
            logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
        ),
    )


def batch_job_handle(request: batch_v1.CreateJobRequest) -> str:
    """The execution handle: the Batch job's resource name (known before it exists)."""
    return f"{request.parent}/jobs/{request.job_id}"


def batch_run_state(job: batch_v1.Job) -> RunState:
    return _STATES[job.status.state]


def create_batch_job(client: batch_v1.BatchServiceClient, request: batch_v1.CreateJobRequest, job_id: str) -> str:
    """Create the job (or meet the one this attempt created before) and return its handle."""
    handle = batch_job_handle(request)
    gcp.create(lambda: client.create_job(request=request), f"job {job_id}: could not create Batch job {handle}")
    return handle


def batch_state(client: batch_v1.BatchServiceClient, handle: str) -> RunState:
    return gcp.read_state(lambda: client.get_job(name=handle), batch_run_state, handle)


def stop_batch_job(client: batch_v1.BatchServiceClient, handle: str) -> None:
    """Delete the job: Batch stops its tasks and VMs. The operation is not waited on."""
    gcp.stop(lambda: client.delete_job(name=handle), handle)


class BatchRuns:
    """What both Batch launchers share: a client made on first use (building a launcher must not need
    credentials), and one Batch job per attempt, launched, read and stopped. Subclasses build the request."""

    _client: batch_v1.BatchServiceClient | None

    def request_for(self, job: Job) -> batch_v1.CreateJobRequest:
        raise NotImplementedError

    @property
    def client(self) -> batch_v1.BatchServiceClient:
        if self._client is None:
            self._client = batch_v1.BatchServiceClient()
        return self._client

    def launch(self, job: Job) -> str:
        """Create the Batch job and return its name; does not wait for it to run."""
        return create_batch_job(self.client, self.request_for(job), job.id)

    def state(self, execution: str) -> RunState:
        return batch_state(self.client, execution)

    def stop(self, execution: str) -> None:
        stop_batch_job(self.client, execution)
