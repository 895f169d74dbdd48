"""Start a job's worker as a Cloud Run Jobs execution.

Cloud Run has no emulator, so this module is split in two: `build_run_request`
is pure (a `run_v2.RunJobRequest` built from the job, tested by value) and
`CloudRunJobsLauncher.launch` only sends it and reads the execution name back.

How jobs map onto Cloud Run job resources (created by infra/main.tf):

- the worker container is named `trainer`; an execution gets its job through
  environment overrides (FEDPIPE_JOB_ID, FEDPIPE_JOB_ATTEMPT), never through
  code or arguments, so a job document cannot make the worker run anything else;
- accelerator "cpu" runs `{job_name}`, "gpu" (one NVIDIA L4, Cloud Run's GPU) runs
  `{job_name}-gpu`: the GPU is a node selector of the job *template*, which run
  overrides cannot change, so GPU work needs its own job resource;
- anything else is refused for good (LaunchRefused): Cloud Run has no TPUs, no other
  GPUs, and its tasks cannot reach each other for a multi-host run (routing.py sends
  those to GKE, Vertex AI or Batch);
- `state` reads the execution's task counts; `stop` cancels the execution;
- with `node_regions` (the production wiring), every node has its own worker
  job `{job_name}-{node}` in the node's region, so raw and processed data never
  leave the region they live in; only weight updates travel to the hub.

Importing this module imports google.cloud.run_v2; `shared.launchers` itself
does not, so functions that never launch on Cloud Run keep a fast cold start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import run_v2
from google.protobuf import duration_pb2

from shared.config import Settings
from shared.jobs import Job
from shared.launchers import LaunchError, LaunchRefused, RunState, gcp
from shared.launchers.naming import ENV_JOB_ATTEMPT, ENV_JOB_ID
from shared.launchers.routing import CLOUD_RUN_GPU, runs_on_cloud_run

CONTAINER_NAME = "trainer"  # the container's name in infra/main.tf's job template
GPU_SUFFIX = "-gpu"
DEFAULT_JOB_NAME = "fedpipe-worker"

# Environment the launcher reads in `from_env` (set on the functions by infra/main.tf);
# the hub region and project come from Settings (FEDPIPE_REGION, FEDPIPE_PROJECT).
ENV_JOB_NAME = "FEDPIPE_WORKER_JOB"
ENV_NODE_REGIONS = "FEDPIPE_NODE_REGIONS"  # "us=us-central1,eu=europe-west4"


def job_resource_name(project: str, region: str, job_name: str) -> str:
    """The full resource name of a Cloud Run job."""
    return f"projects/{project}/locations/{region}/jobs/{job_name}"


def cloud_run_job_for(job_name: str, job: Job) -> str:
    """The Cloud Run job (short name) that can run `job` on its accelerator; LaunchRefused if none can."""
    accelerator = job.spec.accelerator
    if not runs_on_cloud_run(accelerator, job.spec.hosts):
        raise LaunchRefused(
            f"job {job.id}: {accelerator} on {job.spec.hosts} host(s) cannot run on Cloud Run Jobs, which runs cpu "
            f"or {CLOUD_RUN_GPU} on one host; TPUs, other GPUs and multi-host runs need GKE, Vertex AI or Batch"
        )
    return job_name if accelerator.kind == "cpu" else f"{job_name}{GPU_SUFFIX}"


def build_run_request(
    project: str,
    region: str,
    job_name: str,
    job: Job,
    *,
    timeout: timedelta | None = None,
) -> run_v2.RunJobRequest:
    """The RunJob request that starts one execution for `job.attempt`.

    `timeout` replaces the template's task timeout for this execution only. The
    job spec has no wall-clock budget to derive one from (`lease_seconds` is
    heartbeat patience, not a run limit: a lost worker is caught by the lease),
    so by default the template's timeout (infra: var.worker_task_timeout) applies.
    """
    container = run_v2.RunJobRequest.Overrides.ContainerOverride(
        name=CONTAINER_NAME,
        # Merged with the template's env (project, node, bucket prefix ...).
        env=[
            run_v2.EnvVar(name=ENV_JOB_ID, value=job.id),
            run_v2.EnvVar(name=ENV_JOB_ATTEMPT, value=str(job.attempt)),
        ],
    )
    overrides = run_v2.RunJobRequest.Overrides(container_overrides=[container], task_count=1)
    if timeout is not None:
        if timeout <= timedelta(0):
            raise ValueError(f"timeout must be positive, got {timeout}")
        overrides.timeout = duration_pb2.Duration(seconds=int(timeout.total_seconds()))
    return run_v2.RunJobRequest(
        name=job_resource_name(project, region, cloud_run_job_for(job_name, job)),
        overrides=overrides,
    )


def parse_node_regions(text: str) -> dict[str, str]:
    """`"us=us-central1,eu=europe-west4"` -> `{"us": "us-central1", "eu": "europe-west4"}`."""
    regions: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        node, sep, region = item.partition("=")
        if not sep or not node.strip() or not region.strip():
            raise ValueError(f"{ENV_NODE_REGIONS}: expected node=region, got {item!r}")
        regions[node.strip()] = region.strip()
    return regions


class CloudRunJobsLauncher:
    """Implements `shared.launchers.Launcher` with Cloud Run Jobs executions."""

    def __init__(
        self,
        project: str,
        region: str,
        job_name: str = DEFAULT_JOB_NAME,
        client: run_v2.JobsClient | None = None,
        *,
        executions: run_v2.ExecutionsClient | None = None,
        node_regions: Mapping[str, str] | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        self.project = project
        self.region = region
        self.job_name = job_name
        self.node_regions = dict(node_regions) if node_regions is not None else None
        self.timeout = timeout
        self._client = client
        self._executions = executions

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, settings: Settings | None = None
    ) -> CloudRunJobsLauncher:
        """The launcher infra/main.tf configures: FEDPIPE_WORKER_JOB, FEDPIPE_NODE_REGIONS + Settings."""
        env = os.environ if env is None else env
        settings = settings or Settings.from_env(dict(env))
        node_regions = env.get(ENV_NODE_REGIONS)
        return cls(
            project=settings.project,
            region=settings.region,
            job_name=env.get(ENV_JOB_NAME) or DEFAULT_JOB_NAME,
            node_regions=parse_node_regions(node_regions) if node_regions else None,
        )

    @property
    def client(self) -> run_v2.JobsClient:
        # Created on first launch, not in __init__: building a launcher must not
        # need credentials (tests, the CLI's --help, functions that never launch).
        if self._client is None:
            self._client = run_v2.JobsClient()
        return self._client

    @property
    def executions(self) -> run_v2.ExecutionsClient:
        if self._executions is None:
            self._executions = run_v2.ExecutionsClient()
        return self._executions

    def target(self, job: Job) -> tuple[str, str]:
        """(region, base job name) that runs `job`: per node in production."""
        if self.node_regions is None:
            return self.region, self.job_name
        node = job.spec.dataset.node
        if node not in self.node_regions:
            raise LaunchError(
                f"job {job.id}: node {node!r} has no worker region "
                f"(known: {', '.join(sorted(self.node_regions)) or 'none'})"
            )
        return self.node_regions[node], f"{self.job_name}-{node}"

    def request_for(self, job: Job) -> run_v2.RunJobRequest:
        region, job_name = self.target(job)
        return build_run_request(self.project, region, job_name, job, timeout=self.timeout)

    def launch(self, job: Job) -> str:
        """Start the execution and return its name; does not wait for it to finish."""
        request = self.request_for(job)
        try:
            operation = self.client.run_job(request=request)
        except api_exceptions.NotFound as exc:
            raise LaunchError(
                f"job {job.id}: Cloud Run job {request.name} does not exist "
                f"(is it deployed, and enabled in infra for {job.spec.accelerator} work?): {exc.message}"
            ) from exc
        except (
            api_exceptions.GoogleAPICallError,  # PermissionDenied, InvalidArgument, ...
            api_exceptions.RetryError,  # transient errors past the client's retry deadline
            auth_exceptions.GoogleAuthError,  # no or bad credentials where the client is made
        ) as exc:
            raise LaunchError(f"job {job.id}: could not run {request.name}: {exc}") from exc
        return execution_name(operation)

    def state(self, execution: str) -> RunState:
        _require_execution(execution)
        return gcp.read_state(lambda: self.executions.get_execution(name=execution), execution_run_state, execution)

    def stop(self, execution: str) -> None:
        """Cancel the execution; the operation is not waited on."""
        _require_execution(execution)
        gcp.stop(lambda: self.executions.cancel_execution(name=execution), execution)


def _require_execution(execution: str) -> None:
    # `launch` falls back to the RunJob operation's name, which is no execution to read or cancel.
    if "/executions/" not in execution:
        raise LaunchError(f"{execution!r} is not a Cloud Run execution name")


def execution_run_state(execution: run_v2.Execution) -> RunState:
    """An execution's state from its task counts: done once it has a completion time."""
    if execution.completion_time is None:
        return RunState.RUNNING if execution.running_count > 0 else RunState.QUEUED
    if execution.cancelled_count > 0:
        return RunState.CANCELLED
    if execution.failed_count > 0 or execution.succeeded_count < execution.task_count:
        return RunState.FAILED
    return RunState.SUCCEEDED


def execution_name(operation) -> str:
    """The execution's resource name, from the RunJob long-running operation.

    The operation's metadata is the `Execution` being started; its name is the
    handle to follow or cancel it. Falls back to the operation's own name.
    """
    metadata = getattr(operation, "metadata", None)
    name = getattr(metadata, "name", "") if metadata is not None else ""
    if name:
        return name
    raw = getattr(operation, "operation", None)
    if raw is not None and getattr(raw, "name", ""):
        return raw.name
    raise LaunchError("Cloud Run accepted the run but returned no execution name")
