"""Confidential launchers: their requests by value, launch() against fake clients, and infra/confidential.tf.

Compute and Batch have no emulator: the requests are checked field by field in
the library's own types, and `launch` against hand-written clients that record
what they are sent (as tests/unit/test_cloud_run_launcher.py does).
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1, compute_v1

from shared.jobs import DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.batch import ConfidentialBatchLauncher, build_batch_job_request
from shared.launchers.batch_runs import batch_job_handle
from shared.launchers.confidential_space import (
    SEV_SNP_CPU,
    TDX_CPU,
    TDX_H100,
    ConfidentialConfig,
    ConfidentialSpaceLauncher,
    NodeTarget,
    VmShape,
    build_gpu_instance_request,
    build_instance_request,
    instance_handle,
    node_targets,
    require_digest,
    resource_name,
)
from tests.unit.launcher_fakes import FakeBatchClient

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
PROJECT = "acme-fl"
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE = f"europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer@{DIGEST}"
GPU_IMAGE = f"europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer-gpu@{DIGEST}"
EU = NodeTarget(
    node="eu",
    zone="europe-west4-b",
    service_account="fedpipe-worker-eu@acme-fl.iam.gserviceaccount.com",
    subnetwork="projects/acme-fl/regions/europe-west4/subnetworks/fedpipe-workers-eu",
)


def make_job(job_id: str = "job-1", *, node: str = "eu", attempt: int = 1, accelerator: str = "cpu", hosts: int = 1) -> Job:
    spec = JobSpec(dataset=DatasetRef(node=node, dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new(job_id, spec, NOW).model_copy(update={"attempt": attempt})


def metadata_of(request: compute_v1.InsertInstanceRequest) -> dict[str, str]:
    items = request.instance_resource.metadata.items
    keys = [i.key for i in items]
    assert len(keys) == len(set(keys)), f"duplicate metadata keys {keys}"
    return {i.key: i.value for i in items}


# ---------------------------------------------------------------- names and digests


def test_resource_name_is_deterministic_per_attempt_and_within_the_name_rules():
    a1 = resource_name("fedpipe-cs", "job-1", 1)
    assert a1 == resource_name("fedpipe-cs", "job-1", 1)  # a retried launch meets the same name
    assert a1.startswith("fedpipe-cs-job-1-a1-") and re.fullmatch(r"[0-9a-f]{10}", a1.rsplit("-", 1)[1])
    assert resource_name("fedpipe-cs", "job-1", 2) != a1
    # Ids that slug alike, and long ids that share their first 60 characters, stay apart.
    assert resource_name("fedpipe-cs", "Job_1", 1) != resource_name("fedpipe-cs", "job-1", 1)
    long_a, long_b = "x" * 150 + "a", "x" * 150 + "b"
    assert resource_name("fedpipe-cs", long_a, 7) != resource_name("fedpipe-cs", long_b, 7)
    for job_id in ("job-1", "Job_1", long_a, "UPPER.case~id", "9-starts-with-digit", "--", "é"):
        name = resource_name("fedpipe-cs", job_id, 12)
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), name


def test_resource_name_refuses_bad_prefixes_and_attempts():
    with pytest.raises(ValueError):
        resource_name("9lives", "job", 1)
    with pytest.raises(ValueError):
        resource_name("fedpipe-cs", "job", 0)


@pytest.mark.parametrize(
    "image",
    [
        "europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer:latest",
        "europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer",
        "europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer:v1@sha256:" + "0" * 63,  # short digest
        "europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer@sha512:" + "0" * 64,
        "trainer@sha256:" + "0" * 64,  # no registry
    ],
)
def test_images_not_pinned_by_digest_are_refused(image):
    with pytest.raises(ValueError, match="not pinned by digest"):
        require_digest(image)
    with pytest.raises(ValueError, match="not pinned by digest"):
        build_instance_request(PROJECT, EU, make_job(), image)


# ---------------------------------------------------------------- Confidential Space VM (CPU)


def test_sev_snp_instance_by_value():
    request = build_instance_request(PROJECT, EU, make_job("job-42", attempt=3), IMAGE, worker_env={"FEDPIPE_NODE": "eu"})
    name = resource_name("fedpipe-cs", "job-42", 3)

    assert (request.project, request.zone) == ("acme-fl", "europe-west4-b")
    vm = request.instance_resource
    assert vm.name == name
    assert vm.machine_type == "zones/europe-west4-b/machineTypes/n2d-standard-4"
    assert vm.min_cpu_platform == "AMD Milan"
    assert vm.confidential_instance_config == compute_v1.ConfidentialInstanceConfig(confidential_instance_type="SEV_SNP")
    assert vm.shielded_instance_config.enable_secure_boot
    (disk,) = vm.disks
    assert disk.boot and disk.auto_delete
    assert disk.initialize_params.source_image == "projects/confidential-space-images/global/images/family/confidential-space"
    (nic,) = vm.network_interfaces
    assert nic == compute_v1.NetworkInterface(subnetwork=EU.subnetwork)  # no access_configs: no external IP
    assert list(nic.access_configs) == []
    assert vm.service_accounts == [
        compute_v1.ServiceAccount(email=EU.service_account, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    ]
    assert vm.scheduling == compute_v1.Scheduling(
        provisioning_model="STANDARD",
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
        max_run_duration=compute_v1.Duration(seconds=6 * 3600),
        instance_termination_action="DELETE",
    )
    assert metadata_of(request) == {
        "tee-image-reference": IMAGE,
        "tee-restart-policy": "Never",
        "tee-container-log-redirect": "cloud_logging",
        "tee-env-FEDPIPE_NODE": "eu",
        "tee-env-FEDPIPE_JOB_ID": "job-42",
        "tee-env-FEDPIPE_JOB_ATTEMPT": "3",
    }
    assert dict(vm.labels) == {
        "app": "fedpipe",
        "fedpipe-job": "job-42",
        "fedpipe-attempt": "3",
        "fedpipe-node": "eu",
        "fedpipe-name": name,
    }
    assert list(vm.guest_accelerators) == []


def test_the_same_attempt_builds_the_same_request_and_request_id():
    a = build_instance_request(PROJECT, EU, make_job("job-7", attempt=2), IMAGE)
    b = build_instance_request(PROJECT, EU, make_job("job-7", attempt=2), IMAGE)
    c = build_instance_request(PROJECT, EU, make_job("job-7", attempt=3), IMAGE)
    assert a == b and a.request_id == b.request_id
    assert re.fullmatch(r"[0-9a-f-]{36}", a.request_id)
    assert c.request_id != a.request_id and c.instance_resource.name != a.instance_resource.name


def test_tdx_on_c3():
    request = build_instance_request(PROJECT, EU, make_job(), IMAGE, shape=TDX_CPU)
    vm = request.instance_resource
    assert vm.confidential_instance_config.confidential_instance_type == "TDX"
    assert vm.machine_type == "zones/europe-west4-b/machineTypes/c3-standard-4"
    assert "min_cpu_platform" not in vm


def test_debug_image_only_when_asked_for():
    default = build_instance_request(PROJECT, EU, make_job(), IMAGE)
    debug = build_instance_request(PROJECT, EU, make_job(), IMAGE, debug=True)
    assert default.instance_resource.disks[0].initialize_params.source_image.endswith("/family/confidential-space")
    assert debug.instance_resource.disks[0].initialize_params.source_image.endswith("/family/confidential-space-debug")


@pytest.mark.parametrize(
    ("tee", "machine_type"),
    [("SEV_SNP", "c3-standard-4"), ("SEV_SNP", "e2-standard-4"), ("TDX", "n2d-standard-4"), ("TDX", "a2-highgpu-1g")],
)
def test_machine_types_that_cannot_run_the_tee_are_refused(tee, machine_type):
    with pytest.raises(ValueError, match=machine_type):
        VmShape(tee=tee, machine_type=machine_type)


def test_job_id_and_attempt_cannot_be_overridden_by_worker_env():
    with pytest.raises(ValueError, match="FEDPIPE_JOB_ID"):
        build_instance_request(PROJECT, EU, make_job(), IMAGE, worker_env={"FEDPIPE_JOB_ID": "other"})
    with pytest.raises(ValueError, match="not valid"):
        build_instance_request(PROJECT, EU, make_job(), IMAGE, worker_env={"BAD-NAME": "x"})


def test_a_job_of_another_node_is_refused():
    with pytest.raises(ValueError, match="node 'us'"):
        build_instance_request(PROJECT, EU, make_job(node="us"), IMAGE)


def test_node_target_must_be_a_zone_of_its_subnets_region():
    with pytest.raises(ValueError, match="not in the zone's region"):
        NodeTarget(node="eu", zone="us-central1-a", service_account="x", subnetwork=EU.subnetwork)
    with pytest.raises(ValueError, match="not a zone"):
        NodeTarget(node="eu", zone="europe-west4", service_account="x", subnetwork=EU.subnetwork)


def test_gpu_shapes_are_refused_by_the_cpu_builder():
    with pytest.raises(ValueError, match="flex-start"):
        build_instance_request(PROJECT, EU, make_job(), IMAGE, shape=TDX_H100)


# ---------------------------------------------------------------- confidential GPU, DWS flex-start


def test_confidential_h100_with_flex_start_by_value():
    request = build_gpu_instance_request(PROJECT, EU, make_job(accelerator="gpu"), GPU_IMAGE, max_run_duration=timedelta(hours=4))
    vm = request.instance_resource
    assert vm.machine_type == "zones/europe-west4-b/machineTypes/a3-highgpu-1g"
    assert vm.confidential_instance_config.confidential_instance_type == "TDX"
    assert list(vm.guest_accelerators) == []  # a3-highgpu-1g carries its H100
    assert vm.scheduling == compute_v1.Scheduling(
        provisioning_model="FLEX_START",
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
        max_run_duration=compute_v1.Duration(seconds=4 * 3600),
        instance_termination_action="DELETE",
    )
    assert vm.reservation_affinity.consume_reservation_type == "NO_RESERVATION"
    assert vm.disks[0].initialize_params.source_image == (
        "projects/confidential-space-images/global/images/family/confidential-space-preview-cgpu"
    )
    metadata = metadata_of(request)
    assert metadata["tee-image-reference"] == GPU_IMAGE
    assert metadata["tee-install-gpu-driver"] == "true"
    assert metadata["tee-restart-policy"] == "Never"
    assert vm.shielded_instance_config.enable_secure_boot
    assert list(vm.network_interfaces[0].access_configs) == []


def test_flex_start_needs_a_positive_run_limit_of_at_most_seven_days():
    with pytest.raises(ValueError, match="at most"):
        build_gpu_instance_request(PROJECT, EU, make_job(), GPU_IMAGE, max_run_duration=timedelta(days=8))
    with pytest.raises(ValueError, match="positive"):
        build_gpu_instance_request(PROJECT, EU, make_job(), GPU_IMAGE, max_run_duration=timedelta(0))
    with pytest.raises(ValueError, match="no confidential GPU"):
        build_gpu_instance_request(PROJECT, EU, make_job(), GPU_IMAGE, shape=SEV_SNP_CPU, max_run_duration=timedelta(hours=1))


# ---------------------------------------------------------------- Batch on confidential VMs


def test_batch_job_by_value():
    job = make_job("job-9", attempt=2)
    request = build_batch_job_request(PROJECT, EU, job, IMAGE, "fedpipe-cbatch-eu", worker_env={"FEDPIPE_NODE": "eu"})
    job_id = resource_name("fedpipe-cb", "job-9", 2)

    assert request.parent == "projects/acme-fl/locations/europe-west4"
    assert request.job_id == job_id
    assert batch_job_handle(request) == f"projects/acme-fl/locations/europe-west4/jobs/{job_id}"
    (group,) = request.job.task_groups
    assert (group.task_count, group.parallelism) == (1, 1)
    (runnable,) = group.task_spec.runnables
    assert runnable.container == batch_v1.Runnable.Container(image_uri=IMAGE)  # no commands travel
    assert dict(group.task_spec.environment.variables) == {
        "FEDPIPE_NODE": "eu", "FEDPIPE_JOB_ID": "job-9", "FEDPIPE_JOB_ATTEMPT": "2",
    }
    assert group.task_spec.max_retry_count == 0
    assert group.task_spec.max_run_duration.total_seconds() == 6 * 3600
    policy = request.job.allocation_policy
    assert [i.instance_template for i in policy.instances] == ["projects/acme-fl/global/instanceTemplates/fedpipe-cbatch-eu"]
    assert policy.service_account.email == EU.service_account
    assert list(policy.location.allowed_locations) == ["regions/europe-west4"]
    assert request.job.labels["fedpipe-attempt"] == "2" and request.job.labels["fedpipe-name"] == job_id
    assert request.job.logs_policy.destination == batch_v1.LogsPolicy.Destination.CLOUD_LOGGING
    assert request == build_batch_job_request(PROJECT, EU, job, IMAGE, "fedpipe-cbatch-eu", worker_env={"FEDPIPE_NODE": "eu"})


def test_batch_refuses_a_tag():
    with pytest.raises(ValueError, match="digest"):
        build_batch_job_request(PROJECT, EU, make_job(), IMAGE.split("@")[0] + ":latest", "t")


# ---------------------------------------------------------------- launchers against fake clients


class FakeInstancesClient:
    """Records insert requests and get / delete calls; answers with `instance` or a stand-in operation, or raises `error`."""

    def __init__(self, error: Exception | None = None, instance: compute_v1.Instance | None = None) -> None:
        self.requests: list[compute_v1.InsertInstanceRequest] = []
        self.calls: list[tuple[str, str, str, str]] = []
        self.error, self.instance = error, instance

    def insert(self, request=None, **kwargs):
        assert not kwargs, f"launcher passed unexpected arguments {kwargs}"
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return object()  # an ExtendedOperation; the launcher does not wait on it

    def _addressed(self, method: str, project: str, zone: str, instance: str):
        self.calls.append((method, project, zone, instance))
        if self.error is not None:
            raise self.error
        return self.instance

    def get(self, *, project, zone, instance):
        return self._addressed("get", project, zone, instance)

    def delete(self, *, project, zone, instance):
        return self._addressed("delete", project, zone, instance)


def config(**changes) -> ConfidentialConfig:
    values = dict(
        project=PROJECT,
        targets={"eu": EU},
        image=IMAGE,
        gpu_image=GPU_IMAGE,
        worker_env={"eu": {"FEDPIPE_NODE": "eu"}},
    )
    return ConfidentialConfig(**{**values, **changes})


def test_confidential_space_launch_sends_the_built_request_and_returns_the_vm_path():
    client = FakeInstancesClient()
    job = make_job("job-5", attempt=2)
    handle = ConfidentialSpaceLauncher(config(), client=client).launch(job)

    expected = build_instance_request(PROJECT, EU, job, IMAGE, worker_env={"FEDPIPE_NODE": "eu"})
    assert client.requests == [expected]
    assert handle == f"projects/acme-fl/zones/europe-west4-b/instances/{resource_name('fedpipe-cs', 'job-5', 2)}"
    assert handle == instance_handle(expected)


def test_confidential_space_gpu_jobs_get_the_flex_start_h100():
    client = FakeInstancesClient()
    ConfidentialSpaceLauncher(config(max_run_duration=timedelta(hours=2)), client=client).launch(make_job(accelerator="gpu"))
    (request,) = client.requests
    assert request.instance_resource.machine_type.endswith("/a3-highgpu-1g")
    assert request.instance_resource.scheduling.provisioning_model == "FLEX_START"
    assert metadata_of(request)["tee-image-reference"] == GPU_IMAGE


@pytest.mark.parametrize(
    "error",
    [
        api_exceptions.Conflict("The resource 'projects/acme-fl/zones/europe-west4-b/instances/x' already exists"),
        api_exceptions.AlreadyExists("already exists"),
    ],
)
def test_an_existing_vm_for_the_attempt_is_the_same_launch(error):
    ok, exists = FakeInstancesClient(), FakeInstancesClient(error=error)
    job = make_job("job-5")
    first = ConfidentialSpaceLauncher(config(), client=ok).launch(job)
    again = ConfidentialSpaceLauncher(config(), client=exists).launch(job)
    assert again == first
    assert exists.requests == ok.requests  # the retry sent the same request (same name, same request id)


def test_other_conflicts_and_denials_are_launch_errors():
    other = api_exceptions.Conflict("The resource 'x' is being used by 'y'")
    with pytest.raises(LaunchError, match="being used") as info:
        ConfidentialSpaceLauncher(config(), client=FakeInstancesClient(error=other)).launch(make_job("job-3"))
    assert info.value.__cause__ is other and "job-3" in str(info.value)
    denied = api_exceptions.Forbidden("compute.instances.create denied")
    with pytest.raises(LaunchError, match="instances.create"):
        ConfidentialSpaceLauncher(config(), client=FakeInstancesClient(error=denied)).launch(make_job())
    with pytest.raises(LaunchError):
        error = api_exceptions.RetryError("deadline", cause=api_exceptions.ServiceUnavailable("x"))
        ConfidentialSpaceLauncher(config(), client=FakeInstancesClient(error=error)).launch(make_job())


def test_refusals_happen_before_any_request():
    client = FakeInstancesClient()
    launcher = ConfidentialSpaceLauncher(config(gpu_image=None), client=client)
    with pytest.raises(LaunchError, match="'asia' has no confidential worker zone"):
        launcher.launch(make_job(node="asia"))
    with pytest.raises(LaunchError, match="FEDPIPE_CONFIDENTIAL_GPU_IMAGE"):
        launcher.launch(make_job(accelerator="gpu"))
    with pytest.raises(LaunchError, match="tpu:v5e:2x4"):
        launcher.launch(make_job(accelerator="tpu:v5e:2x4"))
    assert client.requests == []


def test_a_config_with_a_tagged_image_cannot_be_built():
    with pytest.raises(ValueError, match="digest"):
        config(image=IMAGE.split("@")[0] + ":latest")


def test_batch_launch_sends_the_built_request_and_treats_already_exists_as_launched():
    client = FakeBatchClient()
    job = make_job("job-8", attempt=4)
    handle = ConfidentialBatchLauncher(config(), client=client).launch(job)
    expected = build_batch_job_request(PROJECT, EU, job, IMAGE, "fedpipe-cbatch-eu", worker_env={"FEDPIPE_NODE": "eu"})
    assert client.requests == [expected]
    assert handle == batch_job_handle(expected)

    exists = FakeBatchClient(error=api_exceptions.AlreadyExists(f"job {expected.job_id} already exists"))
    assert ConfidentialBatchLauncher(config(), client=exists).launch(job) == handle
    assert exists.requests == [expected]

    denied = FakeBatchClient(error=api_exceptions.PermissionDenied("batch.jobs.create"))
    with pytest.raises(LaunchError, match="batch.jobs.create"):
        ConfidentialBatchLauncher(config(), client=denied).launch(job)
    with pytest.raises(LaunchError, match="gpu:nvidia-l4:1"):
        ConfidentialBatchLauncher(config(), client=client).launch(make_job(accelerator="gpu"))


def test_from_env_reads_the_variables_infra_outputs():
    env = {
        "FEDPIPE_PROJECT": "acme-fl",
        "FEDPIPE_REGION": "us-central1",
        "FEDPIPE_CONFIDENTIAL_ZONES": "us=us-central1-a, eu=europe-west4-b",
        "FEDPIPE_CONFIDENTIAL_IMAGE": IMAGE,
        "FEDPIPE_CONFIDENTIAL_TEE": "TDX",
        "FEDPIPE_CONFIDENTIAL_MAX_RUN_SECONDS": "3600",
        "FEDPIPE_CONFIDENTIAL_WORKER_ENV": '{"eu": {"FEDPIPE_NODE": "eu"}}',
        "FEDPIPE_NAME_PREFIX": "fl",
    }
    cfg = ConfidentialConfig.from_env(env)
    assert cfg.targets == node_targets("acme-fl", {"us": "us-central1-a", "eu": "europe-west4-b"}, "fl")
    assert cfg.targets["eu"].service_account == "fl-worker-eu@acme-fl.iam.gserviceaccount.com"
    assert cfg.targets["us"].subnetwork == "projects/acme-fl/regions/us-central1/subnetworks/fl-workers-us"
    assert (cfg.shape, cfg.max_run_duration, cfg.gpu_image, cfg.debug) == (TDX_CPU, timedelta(hours=1), None, False)
    assert ConfidentialBatchLauncher.from_env(env).request_for(make_job()).job.allocation_policy.instances[0].instance_template == (
        "projects/acme-fl/global/instanceTemplates/fl-cbatch-eu"
    )
    with pytest.raises(ValueError, match="FEDPIPE_CONFIDENTIAL_IMAGE"):
        ConfidentialConfig.from_env({k: v for k, v in env.items() if k != "FEDPIPE_CONFIDENTIAL_IMAGE"})
    with pytest.raises(ValueError, match="digest"):
        ConfidentialConfig.from_env({**env, "FEDPIPE_CONFIDENTIAL_IMAGE": IMAGE.split("@")[0] + ":latest"})
    with pytest.raises(ValueError, match="SEV_SNP or TDX"):
        ConfidentialConfig.from_env({**env, "FEDPIPE_CONFIDENTIAL_TEE": "SEV"})


def test_confidential_space_state_reads_and_stop_deletes_the_vm():
    handle = "projects/acme-fl/zones/europe-west4-b/instances/fedpipe-cs-job-5-a2-0123456789"
    client = FakeInstancesClient(instance=compute_v1.Instance(status="RUNNING"))
    launcher = ConfidentialSpaceLauncher(config(), client=client)
    assert launcher.state(handle) is RunState.RUNNING
    launcher.stop(handle)
    address = ("acme-fl", "europe-west4-b", "fedpipe-cs-job-5-a2-0123456789")
    assert client.calls == [("get", *address), ("delete", *address)]

    gone = ConfidentialSpaceLauncher(config(), client=FakeInstancesClient(error=api_exceptions.NotFound("no such instance")))
    assert gone.state(handle) is RunState.GONE
    gone.stop(handle)  # deleted already: nothing to do
    with pytest.raises(LaunchError, match="not a Confidential Space VM handle"):
        launcher.state("projects/acme-fl/locations/europe-west4/jobs/x")
    denied = ConfidentialSpaceLauncher(config(), client=FakeInstancesClient(error=api_exceptions.Forbidden("compute.instances.delete")))
    with pytest.raises(LaunchError, match="compute.instances.delete"):
        denied.stop(handle)


def test_confidential_batch_state_and_stop():
    handle = "projects/acme-fl/locations/europe-west4/jobs/fedpipe-cb-job-8-a4-0123456789"
    client = FakeBatchClient(job=batch_v1.Job(status=batch_v1.JobStatus(state=batch_v1.JobStatus.State.SUCCEEDED)))
    launcher = ConfidentialBatchLauncher(config(), client=client)
    assert launcher.state(handle) is RunState.SUCCEEDED
    launcher.stop(handle)
    assert client.calls == [("get", handle), ("delete", handle)]
    gone = ConfidentialBatchLauncher(config(), client=FakeBatchClient(error=api_exceptions.NotFound("no such job")))
    assert gone.state(handle) is RunState.GONE
    gone.stop(handle)


def test_what_no_confidential_launcher_runs_is_refused_for_good():
    for launcher in (ConfidentialSpaceLauncher(config(), client=FakeInstancesClient()), ConfidentialBatchLauncher(config(), client=FakeBatchClient())):
        with pytest.raises(LaunchRefused, match="tpu:v5e:2x4"):
            launcher.launch(make_job(accelerator="tpu:v5e:2x4"))
        with pytest.raises(LaunchRefused, match="2"):
            launcher.launch(make_job(hosts=2))


def test_shared_launchers_does_not_import_compute_or_batch():
    code = "import sys, shared.launchers; print(any(m in sys.modules for m in ('google.cloud.compute_v1', 'google.cloud.batch_v1')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- infra/confidential.tf and the Dockerfiles


@pytest.fixture(scope="module")
def confidential_tf() -> dict:
    import hcl2

    from tests.unit.infra_hcl import resources, unquote

    with (REPO / "infra" / "confidential.tf").open() as fh:
        doc = unquote(hcl2.load(fh))
    # The variables may live here or, moved by the lead, in variables.tf.
    with (REPO / "infra" / "variables.tf").open() as fh:
        declared = unquote(hcl2.load(fh))
    variables = {name: body for d in (doc, declared) for item in d.get("variable", []) for name, body in item.items()}
    local_values = {k: v for item in doc.get("locals", []) for k, v in item.items()}
    return {"variables": variables, "resources": resources(doc), "locals": local_values}


def test_everything_is_off_by_default(confidential_tf):
    assert confidential_tf["variables"]["confidential_workers"]["default"] is False
    for (rtype, name), body in confidential_tf["resources"].items():
        for_each = body.get("for_each", "")
        assert "confidential_workers" in for_each or "confidential_nodes" in for_each or "confidential_worker_grants" in for_each, (
            rtype, name, for_each,
        )
    assert "var.confidential_workers ? var.nodes : {}" in confidential_tf["locals"]["confidential_nodes"]


def test_image_variables_accept_digests_only(confidential_tf):
    for name in ("confidential_worker_image", "confidential_worker_gpu_image"):
        (validation,) = confidential_tf["variables"][name]["validation"]
        pattern = re.search(r'regex\("(.+?)", var\.', validation["condition"]).group(1).replace("\\\\", "\\")
        assert re.fullmatch(pattern, IMAGE)
        assert not re.fullmatch(pattern, IMAGE.split("@")[0] + ":latest")
        assert not re.fullmatch(pattern, IMAGE[:-1])
        # The same rule as the launchers': what infra accepts, they accept.
        from shared.launchers.naming import DIGEST_REFERENCE

        assert pattern == DIGEST_REFERENCE.pattern


def test_hub_grants_are_scoped(confidential_tf):
    res = confidential_tf["resources"]
    act_as = res[("google_service_account_iam_member", "hub_acts_as_confidential_worker")]
    assert act_as["role"] == "roles/iam.serviceAccountUser"
    assert act_as["service_account_id"] == "${google_service_account.worker[each.key].name}"
    assert act_as["member"] == "${local.hub_member}"

    vms = res[("google_project_iam_member", "hub_creates_confidential_vms")]
    assert vms["role"] == "roles/compute.instanceAdmin.v1"
    (condition,) = vms["condition"]
    expression = condition["expression"]
    assert 'resource.name.extract(\\"/instances/{name}\\").startsWith(\\"${local.confidential_vm_prefix}\\")' in expression
    assert confidential_tf["locals"]["confidential_vm_prefix"] == "${var.name_prefix}-cs-"
    # The launcher's VM names fall under the condition's prefix (infra's default name_prefix).
    assert resource_name("fedpipe-cs", "job-1", 1).startswith("fedpipe-cs-")

    subnet = res[("google_compute_subnetwork_iam_member", "hub_uses_worker_subnet")]
    assert subnet["role"] == "roles/compute.networkUser"
    batch = res[("google_project_iam_member", "hub_runs_confidential_batch")]
    assert batch["role"] == "roles/batch.jobsEditor"

    project_roles = {body["role"] for (rtype, _), body in res.items() if rtype == "google_project_iam_member"}
    assert project_roles == {"roles/compute.instanceAdmin.v1", "roles/batch.jobsEditor", "${each.value.role}"}
    # The workers' project-level roles: attestation tokens, logs, the Batch agent; nothing that reads data.
    assert confidential_tf["locals"]["confidential_worker_roles"] == [
        "roles/confidentialcomputing.workloadUser", "roles/logging.logWriter", "roles/batch.agentReporter",
    ]


def test_batch_template_is_a_confidential_vm_in_the_nodes_subnet(confidential_tf):
    template = confidential_tf["resources"][("google_compute_instance_template", "confidential_batch")]
    from shared.launchers.batch import instance_template_name

    assert template["name"] == "${var.name_prefix}-cbatch-${each.key}"
    assert instance_template_name("${var.name_prefix}", "${each.key}") == template["name"]
    assert template["confidential_instance_config"] == [{"confidential_instance_type": "${var.confidential_tee}"}]
    assert template["shielded_instance_config"][0]["enable_secure_boot"] is True
    assert template["scheduling"][0] == {"on_host_maintenance": "TERMINATE", "automatic_restart": False}
    (nic,) = template["network_interface"]
    assert nic == {"subnetwork": "${google_compute_subnetwork.workers[each.key].id}"}  # no access_config
    assert template["service_account"][0]["email"] == "${google_service_account.worker[each.key].email}"


def test_trainer_base_image_is_pinned_by_digest():
    text = (REPO / "workers" / "trainer" / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms and all(re.fullmatch(r"FROM \S+@sha256:[0-9a-f]{64}( AS \S+)?", line) for line in froms), froms


def test_confidential_launch_policy_allows_exactly_the_env_the_launcher_sets():
    from shared.config import Settings
    from shared.infra_render import render

    text = (REPO / "workers" / "trainer" / "Dockerfile.confidential").read_text()
    allowed = set(re.search(r'"tee\.launch_policy\.allow_env_override"="([^"]*)"', text).group(1).split(","))
    main = (REPO / "infra" / "main.tf").read_text()
    worker_env = re.search(r"^  worker_env = \{(.*?)^  \}", main, re.M | re.S).group(1)  # infra/main.tf local.worker_env
    kek_env = re.search(r"kek_env\s*=\s*\{([^}]*)\}", main).group(1)
    worker_keys = set(re.findall(r"\b(FEDPIPE_[A-Z_]+)\s*=", worker_env + kek_env))
    assert {"FEDPIPE_NODE", "FEDPIPE_NODE_KEKS", "FEDPIPE_KEY_RELEASE_PROVIDER"} <= worker_keys
    assert allowed == {"FEDPIPE_JOB_ID", "FEDPIPE_JOB_ATTEMPT", *worker_keys, *render(Settings())["settings_env"]}
    assert '"tee.launch_policy.log_redirect"="always"' in text
    assert re.search(r"^FROM \$\{TRAINER\}$", text, re.M)
