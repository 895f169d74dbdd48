"""Start a job's worker as a Cloud Batch job on confidential VMs (one task, one attempt).

`build_batch_job_request` is pure (a `batch_v1.CreateJobRequest`, tested by value);
`ConfidentialBatchLauncher.launch` only sends it; state and stop are batch_runs.py's,
shared with the accelerator Batch launcher (batch_gpu.py).

batch_v1's InstancePolicy has no confidential-computing field (google-cloud-batch
0.22: machine_type, min_cpu_platform, provisioning_model, accelerators, disks,
reservation), so the confidential VM is described by an instance template per
node (infra/confidential.tf: `<prefix>-cbatch-<node>`, SEV-SNP or TDX, secure
boot, the node's subnet without external IP, the node's worker identity) and the
job names it in `instance_template`. Batch takes global templates of the job's
own project only.

What this does not give, and why it matters for keys: Batch runs the container
with its own agent on an ordinary guest image, not under the Confidential Space
launcher, so the VM's memory is encrypted but there is no Confidential Space
attestation token (`swname` is not CONFIDENTIAL_SPACE). A key-release policy that
demands one releases no key to a Batch worker. Use Batch for work a node's own
identity may do anyway (preprocessing its own raw data, as the source documents'
genomic pipelines do), and Confidential Space VMs (confidential_space.py) for
anything that needs a released key.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from google.cloud import batch_v1

from shared.jobs import Job
from shared.launchers import LaunchError, LaunchRefused
from shared.launchers.batch_runs import BatchRuns, create_job_request, task_spec
from shared.launchers.confidential_space import DEFAULT_MAX_RUN, ConfidentialConfig, NodeTarget
from shared.launchers.naming import job_env, require_digest, resource_name

DEFAULT_NAME_PREFIX = "fedpipe-cb"


def instance_template_name(infra_prefix: str, node: str) -> str:
    """The node's confidential Batch template, as infra/confidential.tf names it."""
    return f"{infra_prefix}-cbatch-{node}"


def build_batch_job_request(
    project: str,
    target: NodeTarget,
    job: Job,
    image: str,
    instance_template: str,
    *,
    worker_env: Mapping[str, str] | None = None,
    max_run_duration: timedelta = DEFAULT_MAX_RUN,
    name_prefix: str = DEFAULT_NAME_PREFIX,
) -> batch_v1.CreateJobRequest:
    """The CreateJob request that runs `job.attempt` once, in the node's region, on its template's confidential VM."""
    require_digest(image)
    if job.spec.dataset.node != target.node:
        raise ValueError(f"job {job.id} is for node {job.spec.dataset.node!r}, target is node {target.node!r}")
    if max_run_duration <= timedelta(0):
        raise ValueError(f"max_run_duration must be positive, got {max_run_duration}")
    job_id = resource_name(name_prefix, job.id, job.attempt)
    parent = f"projects/{project}/locations/{target.region}"
    task = task_spec(batch_v1.Runnable.Container(image_uri=image), job_env(job, worker_env or {}), max_run_duration)
    allocation = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
            instance_template=f"projects/{project}/global/instanceTemplates/{instance_template}",
        )],
        # The node's worker identity, as in its template (set on both so a
        # template edit cannot silently change who the job runs as).
        service_account=batch_v1.ServiceAccount(email=target.service_account),
        location=batch_v1.AllocationPolicy.LocationPolicy(allowed_locations=[f"regions/{target.region}"]),
    )
    return create_job_request(parent, job_id, job, batch_v1.TaskGroup(task_spec=task, task_count=1, parallelism=1), allocation)


class ConfidentialBatchLauncher(BatchRuns):
    """Implements `shared.launchers.Launcher` with one Batch job per attempt on confidential VMs."""

    def __init__(self, config: ConfidentialConfig, client: batch_v1.BatchServiceClient | None = None) -> None:
        self.config = config
        self._client = client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConfidentialBatchLauncher:
        return cls(ConfidentialConfig.from_env(env))

    def request_for(self, job: Job) -> batch_v1.CreateJobRequest:
        if job.spec.accelerator.kind != "cpu" or job.spec.hosts > 1:
            raise LaunchRefused(
                f"job {job.id}: confidential Batch runs cpu on one host, not {job.spec.accelerator} on {job.spec.hosts} "
                "(confidential GPUs: the Confidential Space launcher with flex-start)"
            )
        target = self.config.target(job)
        try:
            return build_batch_job_request(
                self.config.project, target, job, self.config.image,
                instance_template_name(self.config.infra_prefix, target.node),
                worker_env=self.config.worker_env.get(target.node, {}),
                max_run_duration=self.config.max_run_duration,
                name_prefix=f"{self.config.infra_prefix}-cb",
            )
        except ValueError as exc:
            raise LaunchError(f"job {job.id}: {exc}") from exc
