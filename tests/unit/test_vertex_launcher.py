"""The Vertex AI launcher: CustomJob requests by value, the look-up that makes a retried launch find its job, state and cancel."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import aiplatform_v1 as vertex
from google.protobuf import duration_pb2

from shared.jobs import MAX_QUEUED, DatasetRef, Job, JobSpec
from shared.launchers import LaunchError, LaunchRefused, RunState
from shared.launchers.fleet import Fleet
from shared.launchers.naming import resource_name
from shared.launchers.vertex import VertexLauncher, build_custom_job_request, lookup_request, machine_spec

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGES = {kind: f"europe-west4-docker.pkg.dev/acme-fl/fedpipe/trainer-{kind}@{DIGEST}" for kind in ("cpu", "gpu", "tpu")}
SA = "fedpipe-worker-eu@acme-fl.iam.gserviceaccount.com"
ENV = {"FEDPIPE_NODE": "eu", "FEDPIPE_JOB_ID": "job-1", "FEDPIPE_JOB_ATTEMPT": "2"}
HOUR = timedelta(hours=1)
PARENT = "projects/acme-fl/locations/europe-west4"
HANDLE = f"{PARENT}/customJobs/1234567890"


def make_job(job_id: str = "job-1", *, accelerator: str = "cpu", hosts: int = 1, attempt: int = 2) -> Job:
    spec = JobSpec(dataset=DatasetRef(node="eu", dataset="iris"), accelerator=accelerator, hosts=hosts)
    return Job.new(job_id, spec, NOW).model_copy(update={"attempt": attempt})


def build(job: Job) -> vertex.CreateCustomJobRequest:
    return build_custom_job_request("acme-fl", "europe-west4", job, image=IMAGES[job.spec.accelerator.kind], env=ENV, service_account=SA, max_run=HOUR)


def test_gpu_custom_job_with_flex_start_by_value():
    name = resource_name("fedpipe", "job-1", 2)
    expected = vertex.CreateCustomJobRequest(
        parent=PARENT,
        custom_job=vertex.CustomJob(
            display_name=name,
            labels={"app": "fedpipe", "fedpipe_job": "job-1", "fedpipe_attempt": "2", "fedpipe_node": "eu", "fedpipe_name": name},
            job_spec=vertex.CustomJobSpec(
                worker_pool_specs=[vertex.WorkerPoolSpec(
                    machine_spec=vertex.MachineSpec(
                        machine_type="a3-highgpu-2g", accelerator_type=vertex.AcceleratorType.NVIDIA_H100_80GB, accelerator_count=2,
                    ),
                    replica_count=1,
                    container_spec=vertex.ContainerSpec(image_uri=IMAGES["gpu"], env=[vertex.EnvVar(name=k, value=v) for k, v in ENV.items()]),
                )],
                service_account=SA,
                scheduling=vertex.Scheduling(
                    timeout=duration_pb2.Duration(seconds=3600),
                    restart_job_on_worker_restart=False,
                    disable_retries=True,
                    strategy=vertex.Scheduling.Strategy.FLEX_START,
                    max_wait_duration=duration_pb2.Duration(seconds=int(MAX_QUEUED.total_seconds())),
                ),
            ),
        ),
    )
    assert build(make_job(accelerator="gpu:nvidia-h100-80gb:2")) == expected


def test_single_host_tpu_slices_take_the_machine_of_their_chips():
    request = build(make_job(accelerator="tpu:v5e:2x4"))
    (pool,) = request.custom_job.job_spec.worker_pool_specs
    assert pool.machine_spec == vertex.MachineSpec(machine_type="ct5lp-hightpu-8t", tpu_topology="2x4")
    assert pool.replica_count == 1 and list(pool.container_spec.command) == []  # the image's own entry point
    assert request.custom_job.job_spec.scheduling.strategy == vertex.Scheduling.Strategy.STRATEGY_UNSPECIFIED
    assert machine_spec(make_job(accelerator="tpu:v6e:1x1").spec.accelerator).machine_type == "ct6e-standard-1t"


def test_a_multi_host_slice_is_one_replica_per_host_that_learns_its_role_from_cluster_spec():
    (pool,) = build(make_job(accelerator="tpu:v6e:4x4")).custom_job.job_spec.worker_pool_specs
    assert pool.machine_spec == vertex.MachineSpec(machine_type="ct6e-standard-4t", tpu_topology="4x4")
    assert pool.replica_count == 4
    assert list(pool.container_spec.command) == ["python", "-m", "shared.launchers.host_env", "vertex"]


@pytest.mark.parametrize(("accelerator", "message"), [
    ("tpu:v5p:2x2x2", "Vertex AI runs TPU v5e and v6e slices"),
    ("tpu:v4:2x2x1", "Vertex AI runs TPU v5e and v6e slices"),
    ("tpu:v5e:1x2", "a one-host slice on Vertex AI is 1x1, 2x2, 2x4"),
    ("gpu:nvidia-tesla-t4:8", "Vertex AI runs the GPU shapes nvidia-l4:1|2|4|8, nvidia-tesla-t4:1|2|4"),
    ("gpu:nvidia-b200:1", "nvidia-b200:8"),
])
def test_what_vertex_cannot_run_is_refused_naming_what_it_can(accelerator, message):
    with pytest.raises(LaunchRefused, match=re.escape(message)):
        build(make_job(accelerator=accelerator))


def test_the_name_fits_a_200_character_job_id_and_the_lookup_finds_it_by_label():
    long_id = "J" * 200
    request = build(make_job(long_id))
    name = request.custom_job.display_name
    assert name == build(make_job(long_id)).custom_job.display_name and len(name) <= 63
    assert request.custom_job.labels["fedpipe_name"] == name
    assert lookup_request(request) == vertex.ListCustomJobsRequest(parent=PARENT, filter=f'labels.fedpipe_name="{name}"', page_size=1)


class FakeJobService:
    """Records list/create requests and get/cancel names; `existing` is what a list returns."""

    def __init__(self, existing: list[vertex.CustomJob] = (), answer: vertex.CustomJob | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.existing, self.answer, self.error = list(existing), answer, error

    def _record(self, method: str, value):
        self.calls.append((method, value))
        if self.error is not None:
            raise self.error

    def list_custom_jobs(self, *, request):
        self._record("list", request)
        return iter(self.existing)

    def create_custom_job(self, *, request):
        self._record("create", request)
        return vertex.CustomJob(name=HANDLE, display_name=request.custom_job.display_name)

    def get_custom_job(self, *, name):
        self._record("get", name)
        return self.answer

    def cancel_custom_job(self, *, name):
        self._record("cancel", name)


def launcher(service: FakeJobService) -> VertexLauncher:
    fleet = Fleet(project="acme-fl", regions={"eu": "europe-west4"}, images=IMAGES, worker_env={"eu": {"FEDPIPE_NODE": "eu"}}, max_run=HOUR)
    return VertexLauncher(fleet, clients={"europe-west4": service})


def test_launch_looks_for_the_attempts_job_first_and_creates_it_only_when_none_exists():
    job = make_job(accelerator="tpu:v5e:2x2")
    request = build(job)
    fresh = FakeJobService()
    assert launcher(fresh).launch(job) == HANDLE
    assert fresh.calls == [("list", lookup_request(request)), ("create", request)]

    earlier = FakeJobService(existing=[vertex.CustomJob(name=f"{PARENT}/customJobs/777")])
    assert launcher(earlier).launch(job) == f"{PARENT}/customJobs/777"  # a retried launch: the same run, no second one
    assert [method for method, _ in earlier.calls] == ["list"]

    with pytest.raises(LaunchError, match="could not look for custom job"):
        launcher(FakeJobService(error=api_exceptions.PermissionDenied("aiplatform.customJobs.list"))).launch(job)


def test_state_and_cancel_address_the_job_in_its_region():
    service = FakeJobService(answer=vertex.CustomJob(name=HANDLE, state=vertex.JobState.JOB_STATE_PENDING))
    vertex_launcher = launcher(service)
    assert vertex_launcher.state(HANDLE) is RunState.QUEUED
    vertex_launcher.stop(HANDLE)
    assert service.calls == [("get", HANDLE), ("cancel", HANDLE)]
    assert launcher(FakeJobService(error=api_exceptions.NotFound("gone"))).state(HANDLE) is RunState.GONE
    launcher(FakeJobService(error=api_exceptions.FailedPrecondition("job is already in a final state"))).stop(HANDLE)
    with pytest.raises(LaunchError, match="not a Vertex AI custom job name"):
        vertex_launcher.state("projects/acme-fl/locations/europe-west4/jobs/x")


def test_from_env_reads_the_fleet():
    env = {"FEDPIPE_PROJECT": "acme-fl", "FEDPIPE_NODE_REGIONS": "eu=europe-west4", "FEDPIPE_WORKER_IMAGE_TPU": IMAGES["tpu"]}
    assert VertexLauncher.from_env(env).fleet == Fleet(project="acme-fl", regions={"eu": "europe-west4"}, images={"tpu": IMAGES["tpu"]})
    with pytest.raises(ValueError, match="FEDPIPE_NODE_REGIONS"):
        VertexLauncher.from_env({"FEDPIPE_PROJECT": "acme-fl"})


def test_shared_launchers_and_their_selection_do_not_import_vertex():
    code = "import sys, shared.launchers.select; print('google.cloud.aiplatform_v1' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"
