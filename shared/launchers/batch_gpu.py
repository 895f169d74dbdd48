"""Start a job's worker as a Cloud Batch job on ordinary VMs: GPUs, and multi-host runs.

`build_batch_job_request` is pure (a `batch_v1.CreateJobRequest`, tested by value);
`BatchLauncher` sends it; state and stop are batch_runs.py's. For work that needs a
confidential VM, batch.py's launcher runs on the node's confidential template instead.

- A GPU job runs on the machine that carries its shape (accelerators.GPU_MACHINES),
  with the GPUs named too and Batch installing their drivers; TPUs are refused (GKE and
  Vertex AI run them).
- A multi-host run is one task group of `hosts` tasks, all at once, one per VM, with a
  hosts file: its container starts host_env.py, which reads BATCH_TASK_INDEX,
  BATCH_TASK_COUNT and the hosts file and starts the trainer under shared/multihost.py's
  names (Batch runs containers on the VM's network and mounts the hosts file into them).
- The job id derives from (job id, attempt); `max_retry_count` 0: the job queue owns retries.
- In the node's region, as the node's worker service account, on the node's worker subnet
  without external addresses (as infra names them: `<prefix>-workers-<node>`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

from google.cloud import batch_v1

from shared.accelerators import gpu_machine_type, gpu_shapes
from shared.jobs import Job
from shared.launchers import LaunchRefused
from shared.launchers.batch_runs import BatchRuns, create_job_request, task_spec
from shared.launchers.fleet import Fleet
from shared.launchers.host_env import COMMAND
from shared.launchers.naming import resource_name

CPU_MACHINE = "n2-standard-8"  # a multi-host CPU run


def _instance_policy(job: Job) -> batch_v1.AllocationPolicy.InstancePolicy:
    accelerator = job.spec.accelerator
    if accelerator.kind == "tpu":
        raise LaunchRefused(f"job {job.id}: {accelerator}: Batch runs cpu and the GPU shapes {gpu_shapes()}; TPUs run on GKE or Vertex AI")
    if accelerator.kind == "cpu":
        return batch_v1.AllocationPolicy.InstancePolicy(machine_type=CPU_MACHINE)
    machine = gpu_machine_type(accelerator)
    if machine is None:
        raise LaunchRefused(f"job {job.id}: {accelerator}: Batch runs the GPU shapes {gpu_shapes()}")
    return batch_v1.AllocationPolicy.InstancePolicy(
        machine_type=machine, accelerators=[batch_v1.AllocationPolicy.Accelerator(type_=accelerator.type, count=accelerator.count)]
    )


def build_batch_job_request(
    project: str,
    region: str,
    job: Job,
    *,
    image: str,
    env: Mapping[str, str],
    service_account: str,
    subnetwork: str,
    max_run: timedelta,
    name_prefix: str = "fedpipe-batch",
) -> batch_v1.CreateJobRequest:
    """The CreateJob request that runs `job.attempt` on `job.spec.hosts` VMs at once in `region`."""
    if max_run <= timedelta(0):
        raise ValueError(f"max_run must be positive, got {max_run}")
    hosts = job.spec.hosts
    policy = _instance_policy(job)
    container = batch_v1.Runnable.Container(image_uri=image)
    if hosts > 1:  # the container starts host_env.py, which starts the trainer with its role
        entrypoint, *commands = COMMAND["batch"]
        container = batch_v1.Runnable.Container(image_uri=image, entrypoint=entrypoint, commands=commands)
    job_id = resource_name(name_prefix, job.id, job.attempt)
    parent = f"projects/{project}/locations/{region}"
    task = task_spec(container, env, max_run)
    group = batch_v1.TaskGroup(task_spec=task, task_count=hosts, parallelism=hosts, task_count_per_node=1, require_hosts_file=hosts > 1)
    allocation = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(policy=policy, install_gpu_drivers=job.spec.accelerator.kind == "gpu")],
        service_account=batch_v1.ServiceAccount(email=service_account),
        location=batch_v1.AllocationPolicy.LocationPolicy(allowed_locations=[f"regions/{region}"]),
        network=batch_v1.AllocationPolicy.NetworkPolicy(network_interfaces=[
            batch_v1.AllocationPolicy.NetworkInterface(subnetwork=subnetwork, no_external_ip_address=True),
        ]),
    )
    return create_job_request(parent, job_id, job, group, allocation)


class BatchLauncher(BatchRuns):
    """Implements `shared.launchers.Launcher` with one Batch job per attempt on ordinary VMs."""

    def __init__(self, fleet: Fleet, client: batch_v1.BatchServiceClient | None = None) -> None:
        self.fleet = fleet
        self._client = client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BatchLauncher:
        return cls(Fleet.from_env(os.environ if env is None else env))

    def request_for(self, job: Job) -> batch_v1.CreateJobRequest:
        fleet, node = self.fleet, job.spec.dataset.node
        region = fleet.region(job)
        return build_batch_job_request(
            fleet.project, region, job,
            image=fleet.image(job), env=fleet.env(job), service_account=fleet.service_account(node),
            subnetwork=f"projects/{fleet.project}/regions/{region}/subnetworks/{fleet.infra_prefix}-workers-{node}",
            max_run=fleet.max_run, name_prefix=f"{fleet.infra_prefix}-batch",
        )
