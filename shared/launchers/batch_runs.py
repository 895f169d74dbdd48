"""A Cloud Batch job as one attempt's run: create it, read its state, stop it.

Shared by the confidential Batch launcher (batch.py) and the accelerator one
(batch_gpu.py). Batch lets the client choose the job id, so the id derives from
(job id, attempt) and a retried create meets AlreadyExists: the run it started before.
"""

from __future__ import annotations

from google.cloud import batch_v1

from shared.launchers import RunState, gcp

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
