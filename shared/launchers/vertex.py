"""Start a job's worker as a Vertex AI CustomJob: TPU v5e / v6e slices, and GPUs with DWS flex-start.

`build_custom_job_request` is pure (an `aiplatform_v1.CreateCustomJobRequest`, tested by
value); `VertexLauncher` sends it, reads the job's state and cancels it.

- Vertex AI names a custom job itself, so a deterministic name cannot make a retried
  launch meet its first run. The job carries its attempt's name in a label
  (`fedpipe_name`) and `launch` first lists jobs with that label, returning the one it
  finds instead of creating a second. (A launch that dies between the create and the
  record leaves a job this finds; two launches of one attempt at once cannot happen:
  the claim transaction lets one through.)
- TPU machines: `ct5lp-hightpu-<chips>t` (v5e) and `ct6e-standard-<chips>t` (v6e) with
  the slice's `tpu_topology`; one host's slices are 1x1, 2x2 or 2x4, a multi-host slice
  is `hosts` replicas of the 4-chip machine. Vertex AI has no v4 or v5p for custom jobs
  here: those are refused (GKE runs them).
- GPUs: the machine that carries the shape (accelerators.GPU_MACHINES), scheduled with
  Dynamic Workload Scheduler's FLEX_START strategy, waiting at most MAX_QUEUED for
  capacity (the job queue's own patience with a queued attempt).
- `disable_retries` and no restart on worker restart: the job queue owns retries.
- The job runs as the node's worker service account, in the node's region.
- A multi-host run's replicas learn their roles from Vertex's CLUSTER_SPEC through
  host_env.py (the container's command), under shared/multihost.py's names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

from google.cloud import aiplatform_v1
from google.protobuf import duration_pb2

from shared.accelerators import Accelerator, gpu_machine_type, gpu_shapes
from shared.jobs import MAX_QUEUED, Job
from shared.launchers import LaunchError, LaunchRefused, RunState, gcp
from shared.launchers.fleet import Fleet
from shared.launchers.host_env import COMMAND
from shared.launchers.naming import job_labels, resource_name

TPU_MACHINES = {"v5e": "ct5lp-hightpu-{chips}t", "v6e": "ct6e-standard-{chips}t"}
SINGLE_HOST_TOPOLOGIES = {"1x1": 1, "2x2": 4, "2x4": 8}  # a one-host slice's shape -> its machine's chips
CPU_MACHINE = "n2-standard-8"  # a multi-host CPU run, where the deployment sends those to Vertex AI
LOOKUP_LABEL = "fedpipe_name"  # Vertex's list filter reads label keys as identifiers: no '-'

Strategy = aiplatform_v1.Scheduling.Strategy


def machine_spec(accelerator: Accelerator) -> aiplatform_v1.MachineSpec:
    """The machine one replica runs on; LaunchRefused (naming what Vertex AI runs) for any other accelerator."""
    if accelerator.kind == "tpu":
        if accelerator.type not in TPU_MACHINES:
            raise LaunchRefused(f"{accelerator}: Vertex AI runs TPU {' and '.join(TPU_MACHINES)} slices (GKE runs v4 and v5p)")
        topology = accelerator.topology or ""
        chips = SINGLE_HOST_TOPOLOGIES.get(topology) if accelerator.hosts == 1 else accelerator.chips_per_host
        if chips is None:
            raise LaunchRefused(f"{accelerator}: a one-host slice on Vertex AI is {', '.join(SINGLE_HOST_TOPOLOGIES)}")
        return aiplatform_v1.MachineSpec(machine_type=TPU_MACHINES[accelerator.type].format(chips=chips), tpu_topology=topology)
    if accelerator.kind == "gpu":
        machine = gpu_machine_type(accelerator)
        if machine is None:
            raise LaunchRefused(f"{accelerator}: Vertex AI runs the GPU shapes {gpu_shapes()}")
        return aiplatform_v1.MachineSpec(
            machine_type=machine,
            accelerator_type=aiplatform_v1.AcceleratorType[(accelerator.type or "").upper().replace("-", "_")],
            accelerator_count=accelerator.count,
        )
    return aiplatform_v1.MachineSpec(machine_type=CPU_MACHINE)


def _duration(value: timedelta) -> duration_pb2.Duration:
    if value <= timedelta(0):
        raise ValueError(f"a duration must be positive, got {value}")
    return duration_pb2.Duration(seconds=int(value.total_seconds()))


def vertex_labels(job: Job, name: str) -> dict[str, str]:
    return {key.replace("-", "_"): value for key, value in job_labels(job, name).items()}


def build_custom_job_request(
    project: str,
    region: str,
    job: Job,
    *,
    image: str,
    env: Mapping[str, str],
    service_account: str,
    max_run: timedelta,
    name_prefix: str = "fedpipe",
) -> aiplatform_v1.CreateCustomJobRequest:
    """The CreateCustomJob request that runs `job.attempt` on `job.spec.hosts` replicas in `region`."""
    name = resource_name(name_prefix, job.id, job.attempt)
    container = aiplatform_v1.ContainerSpec(
        image_uri=image,
        env=[aiplatform_v1.EnvVar(name=key, value=value) for key, value in env.items()],
        command=COMMAND["vertex"] if job.spec.hosts > 1 else [],
    )
    scheduling = aiplatform_v1.Scheduling(timeout=_duration(max_run), restart_job_on_worker_restart=False, disable_retries=True)
    if job.spec.accelerator.kind == "gpu":
        scheduling.strategy = Strategy.FLEX_START
        scheduling.max_wait_duration = _duration(MAX_QUEUED)
    return aiplatform_v1.CreateCustomJobRequest(
        parent=f"projects/{project}/locations/{region}",
        custom_job=aiplatform_v1.CustomJob(
            display_name=name,
            labels=vertex_labels(job, name),
            job_spec=aiplatform_v1.CustomJobSpec(
                worker_pool_specs=[aiplatform_v1.WorkerPoolSpec(
                    machine_spec=machine_spec(job.spec.accelerator),
                    replica_count=job.spec.hosts,
                    container_spec=container,
                )],
                service_account=service_account,
                scheduling=scheduling,
            ),
        ),
    )


def lookup_request(request: aiplatform_v1.CreateCustomJobRequest) -> aiplatform_v1.ListCustomJobsRequest:
    """The list that finds the job an earlier launch of this attempt created, by its name label."""
    name = request.custom_job.labels[LOOKUP_LABEL]
    return aiplatform_v1.ListCustomJobsRequest(parent=request.parent, filter=f'labels.{LOOKUP_LABEL}="{name}"', page_size=1)


JobState = aiplatform_v1.JobState
_STATES = {
    JobState.JOB_STATE_UNSPECIFIED: RunState.QUEUED,
    JobState.JOB_STATE_QUEUED: RunState.QUEUED,
    JobState.JOB_STATE_PENDING: RunState.QUEUED,  # waiting for its machines (flex-start capacity, a TPU slice)
    JobState.JOB_STATE_PAUSED: RunState.QUEUED,
    JobState.JOB_STATE_RUNNING: RunState.RUNNING,
    JobState.JOB_STATE_UPDATING: RunState.RUNNING,
    JobState.JOB_STATE_SUCCEEDED: RunState.SUCCEEDED,
    JobState.JOB_STATE_PARTIALLY_SUCCEEDED: RunState.FAILED,  # some replica failed: the attempt did not finish
    JobState.JOB_STATE_FAILED: RunState.FAILED,
    JobState.JOB_STATE_EXPIRED: RunState.FAILED,  # no capacity within max_wait_duration
    JobState.JOB_STATE_CANCELLING: RunState.CANCELLED,
    JobState.JOB_STATE_CANCELLED: RunState.CANCELLED,
}


def custom_job_run_state(custom_job: aiplatform_v1.CustomJob) -> RunState:
    return _STATES[custom_job.state]


def region_of(execution: str) -> str:
    """The region of `projects/P/locations/R/customJobs/ID`."""
    parts = execution.split("/")
    if len(parts) != 6 or parts[0] != "projects" or parts[2] != "locations" or parts[4] != "customJobs":
        raise LaunchError(f"{execution!r} is not a Vertex AI custom job name")
    return parts[3]


class VertexLauncher:
    """Implements `shared.launchers.Launcher` with one Vertex AI CustomJob per attempt."""

    def __init__(self, fleet: Fleet, clients: Mapping[str, aiplatform_v1.JobServiceClient] | None = None) -> None:
        self.fleet = fleet
        self._clients = dict(clients or {})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VertexLauncher:
        return cls(Fleet.from_env(os.environ if env is None else env))

    def client(self, region: str) -> aiplatform_v1.JobServiceClient:
        # Vertex AI is served per region; made on first use: building a launcher must not need credentials.
        if region not in self._clients:
            self._clients[region] = aiplatform_v1.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
        return self._clients[region]

    def request_for(self, job: Job) -> aiplatform_v1.CreateCustomJobRequest:
        try:
            return build_custom_job_request(
                self.fleet.project, self.fleet.region(job), job,
                image=self.fleet.image(job), env=self.fleet.env(job),
                service_account=self.fleet.service_account(job.spec.dataset.node),
                max_run=self.fleet.max_run, name_prefix=self.fleet.infra_prefix,
            )
        except LaunchRefused as exc:
            raise LaunchRefused(f"job {job.id}: {exc}") from exc

    def launch(self, job: Job) -> str:
        """Return the attempt's custom job: the one an earlier launch created, else a new one."""
        request = self.request_for(job)
        client = self.client(self.fleet.region(job))
        name = request.custom_job.display_name
        earlier = gcp.call(
            lambda: next(iter(client.list_custom_jobs(request=lookup_request(request))), None),
            f"job {job.id}: could not look for custom job {name}",
        )
        if earlier is not None:
            return earlier.name
        return gcp.call(lambda: client.create_custom_job(request=request), f"job {job.id}: could not create custom job {name}").name

    def state(self, execution: str) -> RunState:
        client = self.client(region_of(execution))
        return gcp.read_state(lambda: client.get_custom_job(name=execution), custom_job_run_state, execution)

    def stop(self, execution: str) -> None:
        """Cancel the custom job; Vertex AI stops its replicas. The cancel is not waited on."""
        client = self.client(region_of(execution))
        gcp.stop(lambda: client.cancel_custom_job(name=execution), execution)
