"""Start a job's worker in a Confidential Space VM (AMD SEV-SNP or Intel TDX, optionally an H100).

Split like cloud_run.py: `build_instance_request` and `build_gpu_instance_request`
are pure (a `compute_v1.InsertInstanceRequest` built from the job, tested by value);
`ConfidentialSpaceLauncher.launch` only sends it. `state` reads the VM's status (a
stopped VM is ENDED: Compute cannot say how its container ended) and `stop` deletes it.

Why each part of the instance is what it is:

- the Confidential Space image (family `confidential-space` in project
  `confidential-space-images`) runs exactly one container, named by
  `tee-image-reference`, and attests it; the debug family keeps SSH and reports
  `dbgstat` enabled, so a key-release policy refuses it anyway, and it is used only
  when asked for by name (`debug=True`), never by default;
- the image is referenced by digest, never by tag: the key-release policy
  allowlists `image_digest`, and a tag can move to another digest between the
  policy review and the launch;
- the VM name derives from (job id, attempt) and the insert carries a request id
  derived from the same, so a retried launch of one attempt meets the VM it already
  started (409 / AlreadyExists) instead of starting a second worker;
- `tee-restart-policy=Never` and `automatic_restart=False`: a restarted container or
  VM would run the attempt a second time; a lost worker is caught by the job lease
  and retried as a new attempt;
- `max_run_duration` with `instance_termination_action=DELETE` bounds what a VM
  costs when nothing deletes it after its container exits;
- no external IP, the node's worker subnet (Private Google Access), in a zone of the
  node's region, as the node's worker service account: the same data-sovereignty
  wiring as the Cloud Run workers (infra/network.tf, iam.tf).

Importing this module imports google.cloud.compute_v1; `shared.launchers` does not.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from google.cloud import compute_v1

from shared.config import Settings
from shared.jobs import Job
from shared.launchers import LaunchError, LaunchRefused, RunState, gcp
from shared.launchers.naming import (
    job_env,
    job_labels,
    parse_pairs,
    request_id,
    require_digest,
    resource_name,
)

Tee = Literal["SEV_SNP", "TDX"]

IMAGE_PROJECT = "confidential-space-images"
IMAGE_FAMILY = "confidential-space"
DEBUG_IMAGE_FAMILY = "confidential-space-debug"
# Confidential GPUs (Intel TDX + NVIDIA H100 in confidential-computing mode) run on a
# separate, Preview image family; the name is the documented one at the time of
# writing and is a parameter so it can follow the documentation.
GPU_IMAGE_FAMILY = "confidential-space-preview-cgpu"

TEE_ENV_PREFIX = "tee-env-"

DEFAULT_NAME_PREFIX = "fedpipe-cs"  # infra/confidential.tf scopes the hub's compute grant to it
DEFAULT_MAX_RUN = timedelta(hours=6)
MAX_FLEX_START_RUN = timedelta(days=7)  # DWS flex-start's upper bound on max_run_duration
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


@dataclass(frozen=True)
class NodeTarget:
    """Where and as whom one node's confidential workers run (infra/confidential.tf makes them)."""

    node: str
    zone: str  # e.g. "europe-west4-a": in the node's region
    service_account: str  # the node's worker identity
    subnetwork: str  # projects/P/regions/R/subnetworks/S: the node's worker subnet

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", self.zone):
            raise ValueError(f"node {self.node}: {self.zone!r} is not a zone")
        if f"/regions/{self.region}/" not in self.subnetwork:
            raise ValueError(f"node {self.node}: subnetwork {self.subnetwork} is not in the zone's region {self.region}")


@dataclass(frozen=True)
class VmShape:
    """A confidential machine: TEE, machine type, and what the documents say that needs."""

    tee: Tee
    machine_type: str
    min_cpu_platform: str | None = None
    boot_disk_gb: int = 30
    boot_disk_type: str = "pd-balanced"
    gpu: bool = False  # a3-highgpu-1g carries its H100; no guest_accelerators are added

    def __post_init__(self) -> None:
        # SEV-SNP: N2D on AMD Milan or later; TDX: C3, and a3-highgpu-1g for the
        # confidential H100 (TDX only). Anything else is refused by the API late and
        # obscurely, so refuse it here with the values.
        family = self.machine_type.split("-", 1)[0]
        if self.tee == "SEV_SNP" and family != "n2d":
            raise ValueError(f"SEV_SNP runs on n2d machine types, not {self.machine_type}")
        if self.tee == "TDX" and not (family == "c3" or self.machine_type == "a3-highgpu-1g"):
            raise ValueError(f"TDX runs on c3 machine types (or a3-highgpu-1g with an H100), not {self.machine_type}")
        if self.gpu != (self.machine_type == "a3-highgpu-1g"):
            raise ValueError(f"confidential GPU workers run on a3-highgpu-1g (TDX), not {self.machine_type}")


SEV_SNP_CPU = VmShape(tee="SEV_SNP", machine_type="n2d-standard-4", min_cpu_platform="AMD Milan")
TDX_CPU = VmShape(tee="TDX", machine_type="c3-standard-4")
TDX_H100 = VmShape(tee="TDX", machine_type="a3-highgpu-1g", boot_disk_gb=100, gpu=True)


def _instance(
    project: str,
    target: NodeTarget,
    job: Job,
    image: str,
    shape: VmShape,
    *,
    image_family: str,
    worker_env: Mapping[str, str],
    scheduling: compute_v1.Scheduling,
    extra_metadata: Mapping[str, str],
    name_prefix: str,
) -> compute_v1.InsertInstanceRequest:
    require_digest(image)
    if job.spec.dataset.node != target.node:
        raise ValueError(f"job {job.id} is for node {job.spec.dataset.node!r}, target is node {target.node!r}")
    name = resource_name(name_prefix, job.id, job.attempt)
    metadata = {
        "tee-image-reference": image,
        "tee-restart-policy": "Never",
        # Cloud Logging only: the serial console is slow under volume (and the image's
        # launch policy must allow redirection: workers/trainer/Dockerfile.confidential).
        "tee-container-log-redirect": "cloud_logging",
        **extra_metadata,
        **{TEE_ENV_PREFIX + key: value for key, value in job_env(job, worker_env).items()},
    }
    instance = compute_v1.Instance(
        name=name,
        machine_type=f"zones/{target.zone}/machineTypes/{shape.machine_type}",
        confidential_instance_config=compute_v1.ConfidentialInstanceConfig(
            confidential_instance_type=shape.tee,
        ),
        shielded_instance_config=compute_v1.ShieldedInstanceConfig(
            enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
        ),
        scheduling=scheduling,
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=f"projects/{IMAGE_PROJECT}/global/images/family/{image_family}",
                    disk_size_gb=shape.boot_disk_gb,
                    disk_type=f"zones/{target.zone}/diskTypes/{shape.boot_disk_type}",
                ),
            )
        ],
        # No access_configs: no external IP. Google APIs through Private Google Access.
        network_interfaces=[compute_v1.NetworkInterface(subnetwork=target.subnetwork)],
        service_accounts=[compute_v1.ServiceAccount(email=target.service_account, scopes=[CLOUD_PLATFORM_SCOPE])],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in metadata.items()]),
        labels=job_labels(job, name),
    )
    if shape.min_cpu_platform:
        instance.min_cpu_platform = shape.min_cpu_platform
    return compute_v1.InsertInstanceRequest(
        project=project,
        zone=target.zone,
        instance_resource=instance,
        request_id=request_id("instance", project, target.zone, name),
    )


def _duration(value: timedelta) -> compute_v1.Duration:
    if value <= timedelta(0):
        raise ValueError(f"max_run_duration must be positive, got {value}")
    return compute_v1.Duration(seconds=int(value.total_seconds()))


def build_instance_request(
    project: str,
    target: NodeTarget,
    job: Job,
    image: str,
    *,
    shape: VmShape = SEV_SNP_CPU,
    worker_env: Mapping[str, str] | None = None,
    max_run_duration: timedelta = DEFAULT_MAX_RUN,
    debug: bool = False,
    name_prefix: str = DEFAULT_NAME_PREFIX,
) -> compute_v1.InsertInstanceRequest:
    """The insert that starts `job.attempt` in a Confidential Space VM on a CPU (SEV-SNP or TDX)."""
    if shape.gpu:
        raise ValueError("GPU shapes need DWS flex-start provisioning: use build_gpu_instance_request")
    scheduling = compute_v1.Scheduling(
        provisioning_model="STANDARD",
        on_host_maintenance="TERMINATE",  # SEV-SNP and TDX guests cannot live-migrate
        automatic_restart=False,
        max_run_duration=_duration(max_run_duration),
        instance_termination_action="DELETE",
    )
    return _instance(
        project, target, job, image, shape,
        image_family=DEBUG_IMAGE_FAMILY if debug else IMAGE_FAMILY,
        worker_env=worker_env or {},
        scheduling=scheduling,
        extra_metadata={},
        name_prefix=name_prefix,
    )


def build_gpu_instance_request(
    project: str,
    target: NodeTarget,
    job: Job,
    image: str,
    *,
    max_run_duration: timedelta,
    shape: VmShape = TDX_H100,
    worker_env: Mapping[str, str] | None = None,
    image_family: str = GPU_IMAGE_FAMILY,
    name_prefix: str = DEFAULT_NAME_PREFIX,
) -> compute_v1.InsertInstanceRequest:
    """The insert that starts `job.attempt` on a confidential H100 (TDX) with DWS flex-start.

    Flex-start obtains the GPU when capacity frees up (no reservation, no quota
    held) for at most `max_run_duration` (required, at most 7 days), after which
    the VM is deleted. There is no debug variant: pass a debug `image_family`
    explicitly to get one.
    """
    if not shape.gpu:
        raise ValueError(f"{shape.machine_type} has no confidential GPU: use build_instance_request")
    if max_run_duration > MAX_FLEX_START_RUN:
        raise ValueError(f"flex-start VMs run at most {MAX_FLEX_START_RUN}, got {max_run_duration}")
    scheduling = compute_v1.Scheduling(
        provisioning_model="FLEX_START",
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
        max_run_duration=_duration(max_run_duration),
        instance_termination_action="DELETE",
    )
    request = _instance(
        project, target, job, image, shape,
        image_family=image_family,
        worker_env=worker_env or {},
        scheduling=scheduling,
        # The Confidential Space launcher installs the confidential-computing driver.
        extra_metadata={"tee-install-gpu-driver": "true"},
        name_prefix=name_prefix,
    )
    # Flex-start capacity is not drawn from reservations.
    request.instance_resource.reservation_affinity = compute_v1.ReservationAffinity(
        consume_reservation_type="NO_RESERVATION"
    )
    return request


def instance_handle(request: compute_v1.InsertInstanceRequest) -> str:
    """The execution handle of an attempt: the VM's resource path (known before it exists)."""
    return f"projects/{request.project}/zones/{request.zone}/instances/{request.instance_resource.name}"


# ---------------------------------------------------------------- configuration

ENV_ZONES = "FEDPIPE_CONFIDENTIAL_ZONES"  # "us=us-central1-a,eu=europe-west4-a"
ENV_IMAGE = "FEDPIPE_CONFIDENTIAL_IMAGE"  # REGISTRY/PATH@sha256:<64 hex>
ENV_GPU_IMAGE = "FEDPIPE_CONFIDENTIAL_GPU_IMAGE"  # optional; GPU jobs are refused without it
ENV_TEE = "FEDPIPE_CONFIDENTIAL_TEE"  # SEV_SNP (default) | TDX
ENV_MACHINE_TYPE = "FEDPIPE_CONFIDENTIAL_MACHINE_TYPE"  # optional; n2d-standard-4 / c3-standard-4
ENV_MAX_RUN_SECONDS = "FEDPIPE_CONFIDENTIAL_MAX_RUN_SECONDS"  # default 6 h
ENV_WORKER_ENV = "FEDPIPE_CONFIDENTIAL_WORKER_ENV"  # JSON {node: {NAME: value}}
ENV_INFRA_PREFIX = "FEDPIPE_NAME_PREFIX"  # infra's var.name_prefix, default "fedpipe"
ENV_DEBUG = "FEDPIPE_CONFIDENTIAL_DEBUG"  # "true" only for a debug deployment


def node_targets(project: str, zones: Mapping[str, str], infra_prefix: str = "fedpipe") -> dict[str, NodeTarget]:
    """Each node's target with infra's names: `<prefix>-worker-<node>` and subnet `<prefix>-workers-<node>`."""
    targets = {}
    for node, zone in zones.items():
        region = zone.rsplit("-", 1)[0]
        targets[node] = NodeTarget(
            node=node,
            zone=zone,
            service_account=f"{infra_prefix}-worker-{node}@{project}.iam.gserviceaccount.com",
            subnetwork=f"projects/{project}/regions/{region}/subnetworks/{infra_prefix}-workers-{node}",
        )
    return targets


@dataclass(frozen=True)
class ConfidentialConfig:
    """What both confidential launchers read from the environment, once."""

    project: str
    targets: dict[str, NodeTarget]
    image: str
    gpu_image: str | None = None
    shape: VmShape = SEV_SNP_CPU
    max_run_duration: timedelta = DEFAULT_MAX_RUN
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    debug: bool = False
    infra_prefix: str = "fedpipe"  # infra's var.name_prefix: identities, subnets, templates, VM names

    def __post_init__(self) -> None:
        require_digest(self.image)
        if self.gpu_image is not None:
            require_digest(self.gpu_image)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Settings | None = None) -> ConfidentialConfig:
        env = os.environ if env is None else env
        settings = settings or Settings.from_env(dict(env))
        if not env.get(ENV_IMAGE):
            raise ValueError(f"{ENV_IMAGE} is not set (the worker image by digest: infra output confidential_launcher_env)")
        zones = parse_pairs(env.get(ENV_ZONES, ""), ENV_ZONES)
        if not zones:
            raise ValueError(f"{ENV_ZONES} is not set (node=zone pairs, a zone in each node's region)")
        tee = env.get(ENV_TEE, "SEV_SNP")
        if tee not in ("SEV_SNP", "TDX"):
            raise ValueError(f"{ENV_TEE}={tee!r}: expected SEV_SNP or TDX")
        default_shape = SEV_SNP_CPU if tee == "SEV_SNP" else TDX_CPU
        machine_type = env.get(ENV_MACHINE_TYPE) or default_shape.machine_type
        shape = VmShape(tee=tee, machine_type=machine_type, min_cpu_platform=default_shape.min_cpu_platform)
        infra_prefix = env.get(ENV_INFRA_PREFIX) or "fedpipe"
        return cls(
            project=settings.project,
            targets=node_targets(settings.project, zones, infra_prefix),
            image=env[ENV_IMAGE],
            gpu_image=env.get(ENV_GPU_IMAGE) or None,
            shape=shape,
            max_run_duration=timedelta(seconds=int(env.get(ENV_MAX_RUN_SECONDS) or DEFAULT_MAX_RUN.total_seconds())),
            worker_env=json.loads(env.get(ENV_WORKER_ENV) or "{}"),
            debug=env.get(ENV_DEBUG, "").lower() == "true",
            infra_prefix=infra_prefix,
        )

    def target(self, job: Job) -> NodeTarget:
        node = job.spec.dataset.node
        if node not in self.targets:
            raise LaunchError(
                f"job {job.id}: node {node!r} has no confidential worker zone "
                f"(known: {', '.join(sorted(self.targets)) or 'none'})"
            )
        return self.targets[node]


# ---------------------------------------------------------------- launcher


class ConfidentialSpaceLauncher:
    """Implements `shared.launchers.Launcher` with one Confidential Space VM per attempt."""

    def __init__(self, config: ConfidentialConfig, client: compute_v1.InstancesClient | None = None) -> None:
        self.config = config
        self._client = client

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConfidentialSpaceLauncher:
        return cls(ConfidentialConfig.from_env(env))

    @property
    def client(self) -> compute_v1.InstancesClient:
        # Created on first launch: building a launcher must not need credentials.
        if self._client is None:
            self._client = compute_v1.InstancesClient()
        return self._client

    def request_for(self, job: Job) -> compute_v1.InsertInstanceRequest:
        config = self.config
        if job.spec.hosts > 1:
            raise LaunchRefused(f"job {job.id}: a Confidential Space VM runs one host, not {job.spec.hosts}")
        target = config.target(job)
        worker_env = config.worker_env.get(target.node, {})
        try:
            if job.spec.accelerator.kind == "cpu":
                return build_instance_request(
                    config.project, target, job, config.image,
                    shape=config.shape, worker_env=worker_env,
                    max_run_duration=config.max_run_duration, debug=config.debug,
                    name_prefix=f"{config.infra_prefix}-cs",
                )
            if job.spec.accelerator.kind == "gpu":
                if config.gpu_image is None:
                    raise LaunchError(f"job {job.id}: GPU job, but {ENV_GPU_IMAGE} is not set")
                return build_gpu_instance_request(
                    config.project, target, job, config.gpu_image,
                    worker_env=worker_env, max_run_duration=min(config.max_run_duration, MAX_FLEX_START_RUN),
                    name_prefix=f"{config.infra_prefix}-cs",
                )
        except ValueError as exc:
            raise LaunchError(f"job {job.id}: {exc}") from exc
        raise LaunchRefused(f"job {job.id}: accelerator {job.spec.accelerator} has no confidential worker (TPUs cannot be confidential)")

    def launch(self, job: Job) -> str:
        """Insert the VM and return its resource path; does not wait for it to boot."""
        request = self.request_for(job)
        handle = instance_handle(request)
        # The returned ExtendedOperation is not waited on: a VM that fails to start later
        # never heartbeats, and the lease retries the job. A VM of this name is this attempt's.
        gcp.create(lambda: self.client.insert(request=request), f"job {job.id}: could not create {handle}")
        return handle

    def state(self, execution: str) -> RunState:
        project, zone, name = parse_instance_handle(execution)
        return gcp.read_state(lambda: self.client.get(project=project, zone=zone, instance=name), instance_run_state, execution)

    def stop(self, execution: str) -> None:
        """Delete the VM (its container cannot be stopped alone); the operation is not waited on."""
        project, zone, name = parse_instance_handle(execution)
        gcp.stop(lambda: self.client.delete(project=project, zone=zone, instance=name), execution)


_INSTANCE_HANDLE = re.compile(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)")

# Compute says whether the VM runs, not how its container ended: a stopped VM is ENDED and the
# job's own report (or its lease) decides. Every other status is on the way up or down.
_INSTANCE_STATES = {
    "PROVISIONING": RunState.QUEUED,
    "STAGING": RunState.QUEUED,
    "PENDING": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "REPAIRING": RunState.RUNNING,
}


def parse_instance_handle(execution: str) -> tuple[str, str, str]:
    """(project, zone, instance) of a handle `instance_handle` made."""
    match = _INSTANCE_HANDLE.fullmatch(execution)
    if match is None:
        raise LaunchError(f"{execution!r} is not a Confidential Space VM handle (projects/P/zones/Z/instances/N)")
    return match.group(1), match.group(2), match.group(3)


def instance_run_state(instance: compute_v1.Instance) -> RunState:
    """A VM's status as a RunState: queued while it comes up, running, else ended."""
    return _INSTANCE_STATES.get(instance.status, RunState.ENDED)
